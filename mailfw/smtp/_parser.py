"""
Pure parsing of SMTP command lines: bytes in, typed commands (or the reply
that refuses them) out.  No I/O and no session state: what the session
knows (EHLO or HELO, SMTPUTF8, the server's name) comes in as arguments.

The grammar is RFC 5321 section 4.1 with the parameters of the extensions
mailfw offers: SIZE (RFC 1870), BODY (RFC 6152, RFC 3030), SMTPUTF8
(RFC 6531), RET, ENVID, NOTIFY and ORCPT (RFC 3461, with RFC 6533 UTF-8
ORCPT).  Paths may carry an RFC 5321 source route (C{<@a,@b:user@c>}),
which is checked and then ignored, as RFC 5321 appendix C and section 3.6.1
require; the mailbox that remains is what gets routed, so a route naming a
local domain cannot make a remote mailbox look local.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.reply import SMTPReply, SMTPReplyError
from mailfw.smtp._replies import (
    COMMAND_UNRECOGNIZED,
    HELO_SYNTAX,
    INVALID_COMMAND_CHARACTERS,
)

__all__ = [
    "BdatCommand",
    "Command",
    "MailFrom",
    "RcptTo",
    "decodeXtext",
    "encodeXtext",
    "parseBdat",
    "parseCommandLine",
    "parseDomainArgument",
    "parseMailFrom",
    "parseRcptTo",
]

# RFC 5321 4.5.3.1.3: a path is at most 256 octets including "<" and ">".
MAX_PATH = 256
# RFC 3461 4.4 and 4.2: ENVID at most 100 characters, ORCPT at most 500.
MAX_ENVID = 100
MAX_ORCPT = 500

# C0 controls (TAB included: RFC 5321 separates with SP only), DEL and the
# C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# esmtp-value = 1*(%d33-60 / %d62-126), plus UTF-8 (RFC 6531 3.3).
_VALUE = re.compile(r"[^\x00-\x20=\x7f]+\Z")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*\Z")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_UTF8_ADDR = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\x\{[0-9A-Fa-f]{1,6}\})+\Z")
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
_HELO_DOMAIN = re.compile(r"[^\W_]?[\w-]*(?:\.[\w-]+)*\.?\Z")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")
_BDAT = re.compile(r"([0-9]{1,20})(?: +(LAST))?\Z", re.IGNORECASE)
_SIZE = re.compile(r"[0-9]{1,20}\Z")


def _syntax(text: str) -> SMTPReply:
    return SMTPReply(501, "5.5.4", text)


# --- command lines ----------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """
    One command line split into its verb and argument.

    @ivar verb: upper-case, ASCII letters only.
    @ivar argument: the text after the first space, with trailing spaces
        removed; C{""} when there is none.
    """

    verb: str
    argument: str


def parseCommandLine(line: bytes) -> Command | SMTPReply:
    """
    Split a command line (without its CRLF) into verb and argument.

    Refuses (500 5.5.2) lines that are not UTF-8 or contain control
    characters: no command has a use for them, and letting them through
    would carry them into logs and trace headers.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return INVALID_COMMAND_CHARACTERS
    if _CONTROL.search(text):
        return INVALID_COMMAND_CHARACTERS
    text = text.rstrip(" ")
    verb, _, argument = text.partition(" ")
    if not (verb.isascii() and verb.isalpha()):
        return COMMAND_UNRECOGNIZED
    return Command(verb.upper(), argument)


# --- EHLO / HELO ------------------------------------------------------------


def _addressLiteralOK(literal: str) -> bool:
    try:
        # The IPv4 and IPv6 literals, checked as in a mailbox's domain.
        normaliseDomain(literal)
    except AddressError:
        # Else RFC 5321 4.1.3's General-address-literal, which "IPv6:" is not.
        inner = literal[1:-1]
        return inner[:5].lower() != "ipv6:" and bool(_GENERAL_LITERAL.match(inner))
    return True


def parseDomainArgument(argument: str) -> str | SMTPReply:
    """
    Check the argument of EHLO or HELO: one domain name or address literal.

    The check is about syntax only (RFC 5321 4.1.4 forbids refusing a
    client because its name does not match its address).  Underscores,
    which many desktop systems put in their names, and U-labels
    (RFC 6531 3.7.1) are accepted; spaces, parentheses, quotes and the like
    are not, since the name is copied into the C{Received:} header.

    @return: the argument, unchanged, or a 501 reply.
    """
    if not argument or len(argument.encode("utf-8")) > 255:
        return HELO_SYNTAX
    if argument.startswith("[") and argument.endswith("]"):
        return argument if _addressLiteralOK(argument) else HELO_SYNTAX
    if argument.startswith(("-", ".")) or not _HELO_DOMAIN.match(argument):
        return HELO_SYNTAX
    return argument


# --- xtext -----------------------------------------------------------------


def decodeXtext(text: str) -> str:
    """
    Decode RFC 3461 xtext (C{+2B} for C{+}, and so on).

    Hex digits are accepted in either case, although the RFC asks senders
    for upper case.  The decoded octets must be UTF-8 without control
    characters, because they end up in DSNs and logs.

    @raise ValueError: if C{text} is not valid xtext or decodes to
        something unsafe.
    """
    if not _XTEXT.match(text):
        raise ValueError("invalid xtext")
    raw = _XTEXT_HEX.sub(lambda m: "\x00" + m.group(1), text)
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\x00":
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out += c.encode("ascii")
            i += 1
    decoded = bytes(out).decode("utf-8")
    if _CONTROL.search(decoded):
        raise ValueError("control character in xtext")
    return decoded


def encodeXtext(text: str) -> str:
    """
    Encode C{text} as RFC 3461 xtext: the inverse of L{decodeXtext}.
    """
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}" for b in text.encode("utf-8")
    )


def _decodeUTF8Address(text: str, smtputf8: bool) -> str:
    """
    Decode an RFC 6533 C{utf-8-addr-xtext} (or, with SMTPUTF8,
    C{utf-8-addr-unitext}): C{\\x{HEX}} escapes for non-ASCII characters.
    """
    if not _UTF8_ADDR.match(text) or (not smtputf8 and not text.isascii()):
        raise ValueError("invalid utf-8 address")

    def char(m: re.Match[str]) -> str:
        point = int(m.group(1), 16)
        if point < 0x80 or point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            raise ValueError("bad escaped code point")
        return chr(point)

    decoded = _UNICODE_ESCAPE.sub(char, text)
    if _CONTROL.search(decoded):
        raise ValueError("control character in address")
    return decoded


# --- paths -----------------------------------------------------------------


def _scanDomain(text: str, i: int, stops: str) -> int:
    """
    The end of a domain or address literal starting at C{i}.
    """
    n = len(text)
    if i < n and text[i] == "[":
        end = text.find("]", i)
        if end < 0:
            raise SMTPReplyError(_syntax("Unterminated address literal"))
        return end + 1
    while i < n and text[i] not in stops and text[i] != " ":
        i += 1
    return i


@dataclass(frozen=True)
class _Path:
    route: tuple[str, ...]
    mailbox: str
    end: int


def _scanPath(text: str, i: int, what: str) -> _Path:
    """
    Read C{<[route:]mailbox>} starting at C{text[i]}; C{<>} gives an empty
    mailbox.  Quoted local parts may hold C{>}, C{@}, C{:} and spaces.
    """
    n = len(text)
    bad = SMTPReplyError(_syntax(f"Syntax: {what}:<address>"))
    if i >= n or text[i] != "<":
        raise bad
    start = i
    i += 1
    route: list[str] = []
    if text.startswith("@", i):
        while True:
            end = _scanDomain(text, i + 1, ",:>")
            try:
                route.append(normaliseDomain(text[i + 1 : end]))
            except AddressError:
                raise SMTPReplyError(_syntax("Bad source route")) from None
            if end < n and text[end] == ",":
                i = end + 1
                if not text.startswith("@", i):
                    raise SMTPReplyError(_syntax("Bad source route"))
                continue
            if end < n and text[end] == ":":
                i = end + 1
                break
            raise SMTPReplyError(_syntax("Bad source route"))
    boxStart = i
    if text.startswith('"', i):
        i += 1
        while True:
            if i >= n:
                raise SMTPReplyError(_syntax("Unterminated quoted string"))
            c = text[i]
            if c == "\\":
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                i += 1
    else:
        while i < n and text[i] not in "@> ":
            i += 1
    if i < n and text[i] == "@":
        i = _scanDomain(text, i + 1, ">")
    if i >= n or text[i] != ">":
        raise bad
    mailbox = text[boxStart:i]
    if route and not mailbox:
        raise SMTPReplyError(_syntax("Bad source route"))
    if len(text[start : i + 1].encode("utf-8")) > MAX_PATH:
        raise SMTPReplyError(_syntax("Path too long"))
    return _Path(tuple(route), mailbox, i + 1)


def _parameters(text: str, esmtp: bool) -> dict[str, str | None]:
    """
    Split C{SP keyword[=value] ...} into a dict keyed by upper-case keyword.
    """
    if not text:
        return {}
    if not text.startswith(" "):
        raise SMTPReplyError(_syntax("Syntax error in parameters"))
    if not esmtp:
        raise SMTPReplyError(SMTPReply(555, "5.5.4", "Parameters need EHLO"))
    found: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.match(keyword) or (eq and not _VALUE.match(value)):
            raise SMTPReplyError(_syntax("Syntax error in parameters"))
        keyword = keyword.upper()
        if keyword in found:
            raise SMTPReplyError(_syntax(f"Duplicate parameter {keyword}"))
        found[keyword] = value if eq else None
    return found


def _unknown(keyword: str) -> SMTPReplyError:
    return SMTPReplyError(SMTPReply(555, "5.5.4", f"Unsupported parameter {keyword}"))


def _mailbox(text: str, utf8: bool, sender: bool) -> Address:
    if not utf8 and not text.isascii():
        raise SMTPReplyError(SMTPReply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"))
    try:
        return Address.parse(text, utf8=utf8)
    except AddressError as e:
        if sender:
            raise SMTPReplyError(SMTPReply(501, "5.1.7", f"Bad sender address: {e}")) from None
        raise SMTPReplyError(SMTPReply(501, "5.1.3", f"Bad recipient address: {e}")) from None


def _prefix(argument: str, keyword: str) -> int:
    """
    Where the path starts after C{FROM:} or C{TO:}.  Spaces after the colon
    are tolerated (many clients send them; RFC 5321 4.1.2 does not, but
    nothing is ambiguous about them).
    """
    if argument[: len(keyword)].upper() != keyword:
        raise SMTPReplyError(_syntax(f"Syntax: {keyword}<address>"))
    i = len(keyword)
    while argument.startswith(" ", i):
        i += 1
    return i


# --- MAIL ------------------------------------------------------------------


@dataclass(frozen=True)
class MailFrom:
    """
    A parsed C{MAIL FROM}.

    @ivar sender: C{None} for the null reverse-path C{<>}.
    @ivar parameters: every parameter as sent, keyed by upper-case keyword,
        for the policies.
    @ivar route: the source route given (and ignored), for the logs.
    """

    sender: Address | None
    parameters: Mapping[str, str | None] = field(default_factory=dict, hash=False)
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    route: tuple[str, ...] = ()
    requireTLS: bool = False


def parseMailFrom(
    argument: str,
    esmtp: bool = True,
    extraParameters: frozenset[str] = frozenset(),
) -> MailFrom | SMTPReply:
    """
    Parse the argument of MAIL: C{FROM:<path> [parameters]}.

    @param esmtp: the client said EHLO; after HELO no parameters are
        allowed (555).
    @param extraParameters: keywords an extension handles itself (such as
        C{AUTH} later); they are passed through in C{parameters} without
        checks.  Any other unknown keyword gets 555 5.5.4.
    @return: a L{MailFrom}, or the reply refusing the command: 501 for
        syntax, 553 5.6.7 for a UTF-8 address without SMTPUTF8, 555 for a
        parameter this server does not support.
    """
    try:
        return _parseMail(argument, esmtp, extraParameters)
    except SMTPReplyError as e:
        return e.reply


def _parseMail(argument: str, esmtp: bool, extra: frozenset[str]) -> MailFrom:
    path = _scanPath(argument, _prefix(argument, "FROM:"), "MAIL FROM")
    params = _parameters(argument[path.end :], esmtp)
    size = body = ret = envid = None
    smtputf8 = False
    for keyword, value in params.items():
        if keyword == "SIZE":
            if value is None or not _SIZE.match(value):
                raise SMTPReplyError(_syntax("Syntax: SIZE=octets"))
            size = int(value)
        elif keyword == "BODY":
            body = (value or "").upper()
            if body == "BINARYMIME":
                raise SMTPReplyError(SMTPReply(555, "5.5.4", "BODY=BINARYMIME not supported"))
            if body not in ("7BIT", "8BITMIME"):
                raise SMTPReplyError(_syntax("Syntax: BODY=7BIT or BODY=8BITMIME"))
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise SMTPReplyError(_syntax("SMTPUTF8 takes no value"))
            smtputf8 = True
        elif keyword == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise SMTPReplyError(_syntax("Syntax: RET=FULL or RET=HDRS"))
        elif keyword == "ENVID":
            try:
                if value is None or len(value) > MAX_ENVID:
                    raise ValueError("bad length")
                envid = decodeXtext(value)
            except ValueError:
                raise SMTPReplyError(_syntax("Syntax: ENVID=xtext")) from None
        elif keyword == "REQUIRETLS" and keyword in extra:
            # RFC 8689 4: offered (and so in extra) only over TLS.
            if value is not None:
                raise SMTPReplyError(_syntax("REQUIRETLS takes no value"))
        elif keyword not in extra:
            raise _unknown(keyword)
    sender = _mailbox(path.mailbox, smtputf8, True) if path.mailbox else None
    return MailFrom(sender, params, size, body, smtputf8, ret, envid, path.route, "REQUIRETLS" in params)


# --- RCPT ------------------------------------------------------------------


@dataclass(frozen=True)
class RcptTo:
    """
    A parsed C{RCPT TO}.

    @ivar address: the forward-path's mailbox, source route removed; for a
        bare C{<postmaster>}, C{postmaster@}I{hostname}.
    @ivar postmaster: the client sent the bare C{<postmaster>} of RFC 5321
        4.5.1, which must always be accepted.
    @ivar notify: upper-case NOTIFY values; empty when not given.
    @ivar orcpt: C{"addr-type;address"}, decoded, or C{None}.
    """

    address: Address
    postmaster: bool = False
    notify: frozenset[str] = frozenset()
    orcpt: str | None = None
    parameters: Mapping[str, str | None] = field(default_factory=dict, hash=False)
    route: tuple[str, ...] = ()


def _postmaster(hostname: str) -> Address:
    try:
        return Address("postmaster", normaliseDomain(hostname))
    except AddressError:
        return Address("postmaster", hostname.lower())


def parseRcptTo(
    argument: str,
    hostname: str,
    esmtp: bool = True,
    smtputf8: bool = False,
    extraParameters: frozenset[str] = frozenset(),
) -> RcptTo | SMTPReply:
    """
    Parse the argument of RCPT: C{TO:<path> [parameters]}.

    @param hostname: this server's name, the domain of a bare
        C{<postmaster>}.
    @param smtputf8: the transaction's MAIL carried SMTPUTF8, so UTF-8
        addresses are allowed.
    @return: an L{RcptTo} or the refusing reply (see L{parseMailFrom}).
    """
    try:
        return _parseRcpt(argument, hostname, esmtp, smtputf8, extraParameters)
    except SMTPReplyError as e:
        return e.reply


def _parseRcpt(argument: str, hostname: str, esmtp: bool, smtputf8: bool, extra: frozenset[str]) -> RcptTo:
    path = _scanPath(argument, _prefix(argument, "TO:"), "RCPT TO")
    params = _parameters(argument[path.end :], esmtp)
    notify: frozenset[str] = frozenset()
    orcpt = None
    for keyword, value in params.items():
        if keyword == "NOTIFY":
            values = (value or "").upper().split(",")
            if not values or any(v not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for v in values):
                raise SMTPReplyError(_syntax("Syntax: NOTIFY=NEVER or SUCCESS,FAILURE,DELAY"))
            if len(set(values)) != len(values) or ("NEVER" in values and len(values) > 1):
                raise SMTPReplyError(_syntax("Syntax: NOTIFY=NEVER or SUCCESS,FAILURE,DELAY"))
            notify = frozenset(values)
        elif keyword == "ORCPT":
            orcpt = _orcpt(value, smtputf8)
        elif keyword not in extra:
            raise _unknown(keyword)
    if not path.mailbox:
        raise SMTPReplyError(SMTPReply(501, "5.1.3", "Null recipient not allowed"))
    if not path.route and path.mailbox.lower() == "postmaster":
        return RcptTo(_postmaster(hostname), True, notify, orcpt, params)
    address = _mailbox(path.mailbox, smtputf8, False)
    return RcptTo(address, False, notify, orcpt, params, path.route)


def _orcpt(value: str | None, smtputf8: bool) -> str:
    bad = SMTPReplyError(_syntax("Syntax: ORCPT=addr-type;xtext"))
    if value is None or len(value) > MAX_ORCPT:
        raise bad
    addrType, semi, encoded = value.partition(";")
    if not semi or not encoded or not _ATOM.match(addrType):
        raise bad
    decode: Callable[[str], str]
    decode = (lambda text: _decodeUTF8Address(text, smtputf8)) if addrType.lower() == "utf-8" else decodeXtext
    try:
        return f"{addrType};{decode(encoded)}"
    except ValueError:
        raise bad from None


# --- BDAT ------------------------------------------------------------------


@dataclass(frozen=True)
class BdatCommand:
    """
    A parsed C{BDAT size [LAST]} (RFC 3030).
    """

    size: int
    last: bool


def parseBdat(argument: str) -> BdatCommand | SMTPReply:
    """
    Parse the argument of BDAT.
    """
    match = _BDAT.match(argument)
    if match is None:
        return _syntax("Syntax: BDAT size [LAST]")
    return BdatCommand(int(match.group(1)), match.group(2) is not None)
