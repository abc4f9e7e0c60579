"""Credentials stay in the environment: find them in config values, redact them from what is stored or printed.

Object-store credentials come from the environment or ~/.aws (boto3's chain) and never belong in a config: a
config is copied into ``launch.yaml``, ``config.yaml``, every checkpoint, the sbatch script and submitit's
pickles. :func:`find_credentials` lists every config value that holds one (a literal key, a ``NAME=secret``
assignment in a setup line, a ``user:password@`` URL, an Azure connection string, a token); the launcher refuses
those. ``${oc.env:...}`` references are allowed where the value is only used at run time, and written redacted:
:func:`redacted_yaml` is how a resolved config is stored, :func:`redact` how a command line or an error
message is. Values are never echoed: a finding names the config key and the kind of credential only. Hydra echoes
override values in its own errors; :func:`redacted_output` is how the entry points keep those out of what they print.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from omegaconf import DictConfig, ListConfig, OmegaConf

REDACTED = "***"
# A word of an environment-variable or config-key name that says its value is a credential (bounded by non-letters,
# so `num_tokens` or `monkey` are not credentials, `HF_TOKEN` and `AWS_SECRET_ACCESS_KEY` are).
_WORD = (r"(?<![A-Z])(?:SECRETS?|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|CONNECTION[_-]?STRING|SAS"
         r"|(?:API|ACCESS|ACCOUNT|PRIVATE|SESSION|STORAGE|SIGNING|ENCRYPTION|MASTER)[_-]?KEY)(?![A-Z])")
_NAME = re.compile(_WORD, re.I)
_ENV_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
_ENV_REF = re.compile(r"\$\{oc\.env:([^,}]+)")
_INTERP = re.compile(r"\$\{([^}]*)\}")
# The script gd.launch submits renders these cluster settings, resolved, into <run.dir>/submitit/.../*.sh.
RENDERED = ("cluster.setup", "cluster.srun_args", "cluster.sbatch_extra")
ASSIGNMENT = "a credential assignment"
# The value of a NAME=value assignment: 6+ characters, not a shell reference ($VAR is expanded where the job runs and
# stores nothing); an OmegaConf ${...} is resolved into what is written, so it counts.
_VALUE = r"(?P<value>(?!\$(?!\{))[^\s,;\"']{6,})"
# The same value in quotes (NAME="value", --name 'value'): anything up to the closing quote, spaces included.
_QUOTED = r"(?P<quote>[\"'])(?P<value>(?!\$(?!\{))(?:(?!(?P=quote))[^\n]){6,}?)(?P=quote)"

# (kind, pattern, group holding the secret or 0 for the whole match)
_PATTERNS: tuple[tuple[str, re.Pattern, int | str], ...] = (
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)"
                                        r"[A-Z0-9]{16}\b"), 0),
    ("a password in a URL (user:password@host)",
     re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://(?P<userinfo>[^/\s@:]*:[^/\s@]+)@"), "userinfo"),
    ("an Azure/SAS account key or signature",
     re.compile(r"\b(?:AccountKey|SharedAccessKey|SharedAccessSignature|sig)=(?P<value>[^;&\s\"']+)", re.I),
     "value"),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"),
     0),
    ("a bearer token", re.compile(r"\bbearer\s+(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.I), "value"),
    ("an API token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,}|hf_[A-Za-z0-9]{30,}"
                                r"|xox[abposr]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9_-]{20,})"), 0),
    # NAME=value, NAME: value and --name value (each also with the value quoted), where NAME holds a credential
    # word (--api-key as well as API_KEY).
    *((ASSIGNMENT, re.compile(r"(?P<name>[A-Za-z0-9_.-]*" + _WORD + r"[A-Za-z0-9_-]*)\s*[=:]\s*" + value, re.I),
       "value") for value in (_VALUE, _QUOTED)),
    *((ASSIGNMENT, re.compile(r"(?P<name>--[A-Za-z0-9_-]*" + _WORD + r"[A-Za-z0-9_-]*)\s+" + value, re.I), "value")
      for value in (_VALUE, _QUOTED)),
)


def is_credential_name(name: str) -> bool:
    """Whether an environment variable or config key name says its value is a credential."""
    return bool(_NAME.search(str(name)))


def looks_like_credential(name: str) -> bool:
    """cluster.env names refused outright: every AWS_* setting (profile, keys, tokens), names containing KEY, SECRET,
    TOKEN, PASSWORD or CREDENTIAL, and :func:`is_credential_name` (e.g. AZURE_STORAGE_CONNECTION_STRING)."""
    upper = str(name).upper()
    return upper.startswith("AWS_") or any(w in upper for w in _ENV_WORDS) or is_credential_name(name)


def credential_kinds(text: str, *, rendered: bool = False) -> list[str]:
    """Kinds of credential in ``text`` (empty when none). ``rendered``: the text is written out resolved (a sbatch
    line), so an assignment from an interpolation (``TOKEN=${oc.env:TOKEN}``) counts too."""
    kinds = []
    for kind, pattern, _ in _PATTERNS:
        for match in pattern.finditer(text):
            if kind == ASSIGNMENT:
                value = match.group("value")
                if value.startswith("${") and not rendered:
                    continue
                found = f"{kind} to {match.group('name')}"
            else:
                found = kind
            if found not in kinds:  # a kind of several patterns (an assignment quoted or not) is listed once
                kinds.append(found)
            break
    if rendered:
        kinds += [f"an interpolated credential ({ref})" for ref in _ENV_REF.findall(text) if is_credential_name(ref)]
    return kinds


def redact(text: str) -> str:
    """``text`` with every credential :func:`credential_kinds` knows replaced by ``***`` (names and hosts kept)."""
    out = str(text)
    for _, pattern, group in _PATTERNS:
        def repl(m: re.Match, group: int | str = group) -> str:
            if group == 0:
                return REDACTED
            if m.group(group).startswith("${"):  # an unresolved interpolation holds no secret yet
                return m.group(0)
            start, end = m.span(group)
            return m.group(0)[:start - m.start()] + REDACTED + m.group(0)[end - m.start():]
        out = pattern.sub(repl, out)
    return out


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, key, leaf value) for every leaf of a plain container."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        where = (f"{path}.{key}" if path else str(key)) if isinstance(node, dict) else f"{path}[{key}]"
        if isinstance(value, (dict, list)):
            yield from _walk(value, where)
        else:
            yield where, key, value


def _container(cfg: Any, resolve: bool) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=resolve)
    return cfg


def find_credentials(cfg: Any, names_checked_elsewhere: tuple[str, ...] = ()) -> list[str]:
    """Where ``cfg`` (a DictConfig or plain container, unresolved) holds a credential, one line per finding:
    the dotted key and the kind, never the value. Checked: every string value, and every key whose name is a
    credential word that has a literal (not ``${...}``) value (except under ``names_checked_elsewhere``)."""
    found = []
    for path, key, value in _walk(_container(cfg, resolve=False)):
        rendered = path.startswith(RENDERED)
        if isinstance(value, str):
            for kind in credential_kinds(value, rendered=rendered):
                found.append(f"{path} holds {kind}")
        if path.startswith(tuple(f"{n}." for n in names_checked_elsewhere)):
            continue
        literal = value is not None and value != "" and not (isinstance(value, str) and _INTERP.fullmatch(value))
        if isinstance(key, str) and is_credential_name(key) and literal:
            found.append(f"{path} is named like a credential and has a literal value")
        elif isinstance(key, str) and is_credential_name(key) and rendered and value:
            found.append(f"{path} is named like a credential and is written into the job script")
    return found


def _secret_reference(raw: Any) -> bool:
    """Whether an unresolved value interpolates something named like a credential (``${oc.env:AWS_SECRET...}``)."""
    return isinstance(raw, str) and any(is_credential_name(ref) for ref in _INTERP.findall(raw))


def redacted_container(cfg: Any, resolve: bool = True) -> Any:
    """``cfg`` as plain containers with credentials replaced by ``***``: values of keys named like a credential,
    values interpolated from one (``${oc.env:...TOKEN}``, when ``resolve``), and credentials inside strings (URL
    passwords, keys, assignments). Unresolved, a ``${...}`` interpolation is kept as it is: it holds no secret."""
    raw = _container(cfg, resolve=False)
    out = _container(cfg, resolve=resolve) if resolve else raw

    def clean(raw_node: Any, node: Any, key: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(raw_node.get(k) if isinstance(raw_node, dict) else None, v, k) for k, v in node.items()}
        if isinstance(node, list):
            raws = raw_node if isinstance(raw_node, list) and len(raw_node) == len(node) else [None] * len(node)
            return [clean(r, v, key) for r, v in zip(raws, node)]
        if node in (None, "") or isinstance(node, bool):
            return node
        named = isinstance(key, str) and is_credential_name(key)
        if resolve and (named or _secret_reference(raw_node)):
            return REDACTED
        if not resolve and named and not (isinstance(node, str) and _INTERP.fullmatch(node)):
            return REDACTED
        return redact(node) if isinstance(node, str) else node

    return clean(raw, out, None)


def redacted_yaml(cfg: Any, resolve: bool = True) -> str:
    """YAML of ``cfg`` for files (config.yaml, launch.yaml, checkpoints): resolved when ``resolve``, redacted."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted_container(cfg, resolve)))


def redact_argv(argv: list[str]) -> list[str]:
    """A command line for logs: ``key=value`` overrides with a credential-named key get ``key=***``, and every
    argument is passed through :func:`redact`."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if sep and is_credential_name(key.rsplit(".", 1)[-1]):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(redact(arg))
    return out


_MIN_ECHOED = 4  # shorter override values are not searched for in output (they would mangle ordinary words)


def argv_secrets(argv: list[str]) -> list[str]:
    """The credential strings a command line holds, longest first: the value of each ``key=value`` override whose
    key is named like a credential (quotes stripped, as hydra parses them), and each credential :func:`redact`
    finds in an argument. Messages may echo such a value alone ("Value 'x' could not be converted")."""
    found: set[str] = set()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and is_credential_name(key.rsplit(".", 1)[-1]):
            found.add(value.strip("\"'"))
        for _, pattern, group in _PATTERNS:
            for m in pattern.finditer(arg):
                secret = m.group(group)
                if not secret.startswith("${"):
                    found.add(secret)
    return sorted((f for f in found if len(f) >= _MIN_ECHOED), key=len, reverse=True)


def output_redactor(argv: list[str]) -> Callable[[str], str]:
    """A function removing from a text every credential :func:`redact` knows and every one ``argv`` holds."""
    literal = argv_secrets(argv)

    def clean(text: str) -> str:
        text = redact(text)
        for secret in literal:
            text = text.replace(secret, REDACTED)
        return text

    return clean


class _RedactingStream:
    """A text stream writing whole lines through ``clean`` to ``stream``; while ``direct`` it writes straight
    through (a job's own output: progress bars, logs)."""

    def __init__(self, stream: TextIO, clean: Callable[[str], str]) -> None:
        self.stream, self.clean, self.direct, self._pending = stream, clean, False, ""

    def write(self, text: str) -> int:
        if self.direct:
            return self.stream.write(text)
        head, newline, tail = (self._pending + text).rpartition("\n")
        self._pending = tail
        if newline:
            self.stream.write(self.clean(head + newline))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.stream.write(self.clean(self._pending))
            self._pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ... of the real stream
        return getattr(self.stream, name)


class OutputGuard:
    """What :func:`redacted_output` yields: :meth:`passthrough` lets a block print unredacted."""

    def __init__(self, streams: tuple[_RedactingStream, _RedactingStream]) -> None:
        self.streams = streams

    @contextmanager
    def passthrough(self) -> Iterator[None]:
        """Restore the real stdout/stderr inside the block; streams bound to the redacting ones meanwhile (hydra's
        log handlers) write straight through too."""
        out, err = self.streams
        for s in self.streams:
            s.flush()
            s.direct = True
        before = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out.stream, err.stream
        try:
            yield
        finally:
            sys.stdout, sys.stderr = before
            for s in self.streams:
                s.direct = False


@contextmanager
def redacted_output(argv: list[str]) -> Iterator[OutputGuard]:
    """Within the block, what is printed to stdout and stderr has the credentials of ``argv`` (and any
    :func:`redact` finds) replaced by ``***``, line by line; an exception escaping it (hydra raises its errors
    with HYDRA_FULL_ERROR=1) is printed redacted too, and the process exits 1."""
    import traceback

    clean = output_redactor(argv)
    real = sys.stdout, sys.stderr
    streams = (_RedactingStream(real[0], clean), _RedactingStream(real[1], clean))
    sys.stdout, sys.stderr = streams
    try:
        yield OutputGuard(streams)
    except Exception:  # noqa: BLE001 - printed (redacted) instead of by the interpreter (verbatim)
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        for s in streams:
            s.flush()
        sys.stdout, sys.stderr = real
