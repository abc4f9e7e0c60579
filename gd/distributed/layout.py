"""How ranks share a group (group parallelism): the one owner of the layout's arithmetic.

``group_parallel`` P consecutive ranks form one replica: rank k*P + r is member rank r of replica k, holding members
r*N/P .. (r+1)*N/P - 1 of every group of N; the world holds world/P replicas. P must divide the world and N, and
(Ulysses, which gives each rank H/P heads) the model's attention heads. Training (gd.diffusion.plan.batch_layout),
sampling (gd.sample), the model's group-parallel context (gd.models.group_parallel) and launch validation
(gd.launch.validate) check through :class:`ParallelLayout` and its two helpers. Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

IMPLS = ("ulysses", "allgather")
# The config keys a section's errors name: (degree, group size, implementation).
_KEYS = {"train": ("train.group_parallel", "diffusion.group_size", "train.group_parallel_impl"),
         "sample": ("sample.group_parallel", "sample.group_size", "sample.group_parallel_impl"),
         "": ("group_parallel P", "group_size N", "group parallel impl")}


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def members_per_rank(group_size: int, degree: int) -> int:
    """N/P, or a clear error when P does not divide N."""
    if degree < 1:
        raise ValueError(f"group_parallel P={degree}: expected >= 1")
    if group_size % degree:
        raise ValueError(_members_error(group_size, degree, ""))
    return group_size // degree


def check_heads(num_heads: int, degree: int, impl: str) -> None:
    """Ulysses gives each rank H/P heads: a clear error naming both when P does not divide H."""
    if impl == "ulysses" and num_heads % degree:
        raise ValueError(f"num_heads={num_heads} is not divisible by group_parallel P={degree}: Ulysses gives each "
                         f"rank H/P heads; use a P that divides {num_heads} or impl='allgather'")


def _members_error(n: int, p: int, section: str) -> str:
    degree_key, size_key, _ = _KEYS[section]
    what = ("a run without groups (group size 1)" if n == 1
            else "each of the P ranks of a group-parallel group holds N/P members of every group")
    fix = f"; use a P that divides {n}" + (f" or {degree_key}=1" if n > 1 else "") if section else ""
    return f"{size_key}={n} is not divisible by {degree_key}={p}: {what}{fix}"


@dataclass(frozen=True)
class ParallelLayout:
    """``world`` ranks in replicas of ``group_parallel`` P, groups of ``group_size`` N, a model of ``heads``
    attention heads under ``impl`` (N or heads None: not checked); ``section`` ("train", "sample" or "") says which config
    keys the errors name. Build it with :meth:`resolve`, which checks it."""

    world: int
    group_parallel: int = 1
    group_size: int | None = None
    heads: int | None = None
    impl: str = "ulysses"
    section: str = ""

    def problems(self) -> list[str]:
        """Every rule the layout breaks, one line each naming the values (empty: it holds)."""
        degree_key, _, impl_key = _KEYS[self.section]
        p, n, world = self.group_parallel, self.group_size, self.world
        if not _positive(p):
            return [f"{degree_key}={p!r}: expected a positive integer"]
        out = []
        if self.impl not in IMPLS:
            out.append(f"{impl_key}={self.impl!r}: expected one of {', '.join(IMPLS)}")
        if p > 1 and world % p:
            out.append(f"{degree_key}={p} does not divide the {world} processes: a group-parallel group is {p} "
                       f"consecutive ranks")
        if p > 1 and n is not None and n % p:
            out.append(_members_error(n, p, self.section))
        if p > 1 and self.heads is not None and self.impl in IMPLS:
            try:
                check_heads(int(self.heads), p, self.impl)
            except ValueError as err:
                out.append(str(err))
        return out

    @classmethod
    def resolve(cls, world: int, group_parallel: object = 1, group_size: int | None = None, heads: int | None = None,
                impl: str | None = None, section: str = "") -> ParallelLayout:
        """The layout, checked: a ValueError naming every broken rule ("; "-joined). ``group_parallel`` and ``impl``
        None mean the defaults (1, ulysses)."""
        layout = cls(int(world), 1 if group_parallel is None else group_parallel,  # type: ignore[arg-type]
                     None if group_size is None else int(group_size), heads, impl or "ulysses", section)
        problems = layout.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return layout

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: world / P."""
        return self.world // self.group_parallel

    @property
    def members(self) -> int:
        """Members of each group a rank holds: N/P."""
        if self.group_size is None:
            raise ValueError("ParallelLayout.members: the layout has no group_size")
        return members_per_rank(self.group_size, self.group_parallel)

    def replica(self, rank: int) -> int:
        """The replica of global ``rank``: rank // P."""
        return int(rank) // self.group_parallel

    def member_rank(self, rank: int) -> int:
        """``rank``'s place among its replica's P ranks: rank % P."""
        return int(rank) % self.group_parallel

    def member_slice(self, rank: int) -> slice:
        """The members of every group ``rank`` holds: r*N/P .. (r+1)*N/P - 1 for r = rank % P."""
        m = self.members
        first = self.member_rank(rank) * m
        return slice(first, first + m)
