"""One way to show a URL anywhere (logs, JSON lines, summaries, errors): without its credentials.

Torch-free and dependency-free: the runtime, the sinks and the sources all use :func:`redact_url` and
:func:`redact_secrets_in`.
"""

from __future__ import annotations

import re

REDACTED = "***"

_SCHEME_TEXT = r"[a-zA-Z][a-zA-Z0-9+.-]*://"  # RFC 3986 scheme, then "://"
_SCHEME = re.compile(rf"^({_SCHEME_TEXT})(.*)$", re.DOTALL)


def userinfo_end(rest: str) -> int:
    """Index in ``rest`` (the URL after ``scheme://``) where the user-info part ends (its last ``@``), or -1.

    A password may itself hold ``@``, ``/``, ``?`` or ``#``, so the user-info is taken up to the last ``@`` before
    the query; when that part has no ``/`` at all (the ``?`` or ``#`` was inside the password), up to the last
    ``@`` of the whole URL. Cutting too much only hides more.
    """
    query = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, query)
    if at < 0 and "/" not in rest[:query]:
        at = rest.rfind("@")
    return at


def _redact_query(tail: str) -> str:
    """``?a=1&token=x&t0k#frag`` -> ``?a=***&token=***&***#***``: every query value (a bare item too) and the
    fragment are hidden."""
    query, hash_mark, _fragment = tail.partition("#")
    if query.startswith("?"):
        pairs = [p.partition("=") for p in query[1:].split("&")]
        query = "?" + "&".join(f"{k}={REDACTED}" if sep else REDACTED for k, sep, _v in pairs)
    return query + (f"#{REDACTED}" if hash_mark else "")


#: A stream path segment that is a token (UniFi Protect's RTSP streams: 16 letters and digits): 16 or more letters
#: and digits, no separators, both kinds in it; a camera's stream name (``h264Preview_01_main``,
#: ``Streaming/Channels/101``, ``ThisIsLongCameraName``) stays readable, so two channels can be told apart
_STREAM_TOKEN = re.compile(r"(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{16,}")


def _redact_path(path: str) -> str:
    """A URL path with token segments (:data:`_STREAM_TOKEN`) and the values of ``;name=value`` parameters
    (``;jsessionid=...``) hidden."""
    parts = []
    for segment in path.split("/"):
        name, *params = segment.split(";")
        name = REDACTED if _STREAM_TOKEN.fullmatch(name) else name
        parts.append(";".join([name, *(f"{k}={REDACTED}" if sep else REDACTED
                                       for k, sep, _v in (q.partition("=") for q in params))]))
    return "/".join(parts)


def redact_url(url: str, hide_path: bool = False) -> str:
    """``url`` with user name, password, token-only user part, query values and fragment replaced by ``***``.

    ``rtsp://admin:p@ss/w0rd@10.0.0.5/live?token=abc`` -> ``rtsp://admin:***@10.0.0.5/live?token=***``. The user
    name is kept when a password follows it (it helps to tell cameras apart); a user part without ``:`` is
    treated as a token and hidden. Path segments that are tokens (16+ letters and digits, both kinds) and
    ``;name=`` parameter values are hidden; ``hide_path`` hides the whole path, for webhook URLs, which often
    carry their token there (``https://hooks.slack.com/services/T/B/SECRET`` -> ``https://hooks.slack.com/***``).
    Text that is not a URL (no ``scheme://``) is returned unchanged.
    """
    match = _SCHEME.match(str(url))
    if not match:
        return str(url)
    scheme, rest = match.groups()
    at = userinfo_end(rest)
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        rest = (f"{user}:{REDACTED}" if colon else REDACTED) + "@" + rest[at + 1:]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head = rest[:cut]
    if hide_path and "/" in head and head.partition("/")[2]:
        head = head.partition("/")[0] + "/" + REDACTED
    elif "/" in head:
        host, _, path = head.partition("/")
        head = host + "/" + _redact_path(path)
    return scheme + head + _redact_query(rest[cut:])


#: a quoted URL up to its closing quote (its password may hold a space) ...
_QUOTED_URL = re.compile(rf"(?<=\"){_SCHEME_TEXT}[^\"]*(?=\")|(?<='){_SCHEME_TEXT}[^']*(?=')")
#: ... and any URL up to white space (a password may hold a quote: the quoted pass alone would stop at it)
_URL_IN_TEXT = re.compile(rf"{_SCHEME_TEXT}\S+")


#: ``name=value`` properties whose value is a secret: the name, or its last ``-``/``_``/``.`` part, is a secret word
#: (GStreamer ``rtspsrc user-pw=``, ``proxy-pw=``, ``srtsrc passphrase=``, ``aes-key=``, a ``cookies=``); the name is
#: kept, the value (quoted or not) hidden. ``bypass=``, ``passthrough=`` or ``key-int-max=`` are left alone.
_SECRET_PROPERTY = re.compile(
    r"(?i)(?<![\w.-])((?:[a-z0-9]+[-_.])*(?:pw|pass|passwd|password|passphrase|secret|token|cookies?|key|apikey|"
    r"auth|authorization|credentials?|headers?))(\s*=\s*)(\"[^\"]*\"|'[^']*'|[^\s!]+)")


def redact_secrets_in(text: str) -> str:
    """``text`` (a source, an error message) with every URL in it (e.g. ``rtspsrc location=rtsp://u:p@cam/live !
    ...``) passed through :func:`redact_url`, and the values of secret-looking properties (``user-pw=...``,
    ``proxy-pw=...``, ``extra-headers="Authorization: ..."``) hidden."""
    text = _QUOTED_URL.sub(lambda m: redact_url(m.group(0)), str(text))  # redacting twice changes nothing
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _SECRET_PROPERTY.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
