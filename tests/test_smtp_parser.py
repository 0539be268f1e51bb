"""
Tests for L{mailfw.smtp._parser}: command lines to typed commands, table
driven.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.reply import SMTPReply
from mailfw.smtp._parser import (
    BdatCommand,
    Command,
    MailFrom,
    RcptTo,
    decodeXtext,
    encodeXtext,
    parseBdat,
    parseCommandLine,
    parseDomainArgument,
    parseMailFrom,
    parseRcptTo,
)

HOST = "mx.example.org"


class CommandLineTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        Verbs are case-insensitive ASCII letters; the argument is what
        follows the first space; bad bytes and controls are 500 5.5.2.
        """
        cases: list[tuple[bytes, object]] = [
            (b"NOOP", Command("NOOP", "")),
            (b"noop", Command("NOOP", "")),
            (b"MaIl FROM:<a@b.c>", Command("MAIL", "FROM:<a@b.c>")),
            (b"RSET  ", Command("RSET", "")),
            (b"HELO  x", Command("HELO", " x")),
            (b"EHLO \xc3\xa9.example", Command("EHLO", "\xe9.example")),
            (b"", 500),
            (b" NOOP", 500),
            (b"NO-OP", 500),
            (b"N\xc3\xa9OP", 500),
            (b"NOOP\x00", 500),
            (b"NOOP\tx", 500),
            (b"MAIL FROM:<a\x7f@b.c>", 500),
            (b"MAIL FROM:<\xff@b.c>", 500),
            (b"EHLO \xc2\x85", 500),
        ]
        for line, expected in cases:
            result = parseCommandLine(line)
            if isinstance(expected, int):
                assert isinstance(result, SMTPReply), line
                self.assertEqual(result.code, expected, repr(line))
            else:
                self.assertEqual(result, expected, repr(line))


class DomainArgumentTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        EHLO/HELO take one domain (underscores and U-labels allowed) or an
        address literal; anything else, which would end up in the trace
        header, gets 501.
        """
        good = [
            "client.example.net",
            "localhost",
            "DESKTOP_X1",
            "host.example.",
            "bücher.example",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[x-tag:anything]",
            "a-b.c",
        ]
        bad = [
            "",
            "two words",
            "-leading",
            ".leading",
            "a..b",
            "(comment)",
            'quo"te',
            "semi;colon",
            "[192.0.2.300]",
            "[IPv6:zz::1]",
            # A scope names no host on the Internet (found by the fuzzer).
            "[IPv6:fe80::1%eth0]",
            "[IPv6:::%\xb6]",
            "[]",
            "x" * 256,
            "a@b",
        ]
        for name in good:
            self.assertEqual(parseDomainArgument(name), name, name)
        for name in bad:
            result = parseDomainArgument(name)
            self.assertIsInstance(result, SMTPReply, name)
            assert isinstance(result, SMTPReply)
            self.assertEqual(result.code, 501, name)


def _code(result: object) -> int | None:
    return result.code if isinstance(result, SMTPReply) else None


class MailFromTests(SynchronousTestCase):
    def test_paths(self) -> None:
        """
        Paths must be in angle brackets; the null path is C{None}; source
        routes are dropped; quoted local parts may hold specials.
        """
        cases: list[tuple[str, object]] = [
            ("FROM:<a@example.com>", Address("a", "example.com")),
            ("from:<a@EXAMPLE.com>", Address("a", "example.com")),
            ("FROM: <a@example.com>", Address("a", "example.com")),
            ("FROM:<>", None),
            ("FROM:<@relay.example:a@example.com>", Address("a", "example.com")),
            ("FROM:<@r1.example,@r2.example:a@example.com>", Address("a", "example.com")),
            ('FROM:<"a b>c"@example.com>', Address('"a b>c"', "example.com")),
            ('FROM:<"a\\"b"@example.com>', Address('"a\\"b"', "example.com")),
            ("FROM:<a@[192.0.2.1]>", Address("a", "[192.0.2.1]")),
            ("FROM:<a@[IPv6:2001:db8::1]>", Address("a", "[IPv6:2001:db8::1]")),
        ]
        for argument, sender in cases:
            result = parseMailFrom(argument)
            self.assertIsInstance(result, MailFrom, argument)
            assert isinstance(result, MailFrom)
            self.assertEqual(result.sender, sender, argument)

    def test_sourceRouteRecorded(self) -> None:
        """
        The ignored source route is kept for the logs.
        """
        result = parseMailFrom("FROM:<@Relay.Example:a@example.com>")
        assert isinstance(result, MailFrom)
        self.assertEqual(result.route, ("relay.example",))

    def test_errors(self) -> None:
        """
        Each malformed MAIL argument gets the right code.
        """
        cases: list[tuple[str, int]] = [
            ("", 501),
            ("FROM:", 501),
            ("FROM:a@example.com", 501),
            ("TO:<a@example.com>", 501),
            ("FROM:<a@example.com", 501),
            ("FROM:<a@example.com>x", 501),
            ("FROM:<a b@example.com>", 501),
            ("FROM:<a@b@example.com>", 501),
            ("FROM:<a>", 501),
            ("FROM:<@example.com>", 501),
            ("FROM:<a@example..com>", 501),
            ("FROM:<@relay.example:>", 501),
            ("FROM:<@relay.example,a@example.com>", 501),
            ("FROM:<@:a@example.com>", 501),
            ('FROM:<"unterminated@example.com>', 501),
            ("FROM:<a@[300.1.1.1]>", 501),
            ("FROM:<" + "a" * 65 + "@example.com>", 501),
            ("FROM:<a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 63 + ">", 501),
            ("FROM:<ü@example.com>", 553),
            ("FROM:<a@bücher.example>", 553),
            ("FROM:<a@example.com> FOO=bar", 555),
            ("FROM:<a@example.com> REQUIRETLS", 555),
            ("FROM:<a@example.com> AUTH=<>", 555),
            ("FROM:<a@example.com> SIZE=", 501),
            ("FROM:<a@example.com> SIZE=abc", 501),
            ("FROM:<a@example.com> SIZE", 501),
            ("FROM:<a@example.com> SIZE=" + "9" * 21, 501),
            ("FROM:<a@example.com> SIZE=1 SIZE=2", 501),
            ("FROM:<a@example.com> size=1 SIZE=2", 501),
            ("FROM:<a@example.com> BODY=9BIT", 501),
            ("FROM:<a@example.com> BODY", 501),
            ("FROM:<a@example.com> BODY=BINARYMIME", 555),
            ("FROM:<a@example.com> SMTPUTF8=yes", 501),
            ("FROM:<a@example.com> RET=ALL", 501),
            ("FROM:<a@example.com> ENVID=a+zz", 501),
            ("FROM:<a@example.com> ENVID=" + "a" * 101, 501),
            ("FROM:<a@example.com> ENVID=a+0D+0Ab", 501),
            ("FROM:<a@example.com> -BAD=1", 501),
            ("FROM:<a@example.com> X=a=b", 501),
        ]
        for argument, code in cases:
            self.assertEqual(_code(parseMailFrom(argument)), code, argument)

    def test_parameters(self) -> None:
        """
        SIZE, BODY, SMTPUTF8, RET and ENVID are checked and decoded; all
        parameters are kept, keyed upper-case, for the policies.
        """
        result = parseMailFrom(
            "FROM:<ü@bücher.example>  size=1024 body=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2Bx+3D1"
        )
        assert isinstance(result, MailFrom)
        self.assertEqual(result.sender, Address("ü", "xn--bcher-kva.example"))
        self.assertEqual(result.size, 1024)
        self.assertEqual(result.body, "8BITMIME")
        self.assertTrue(result.smtputf8)
        self.assertEqual(result.ret, "HDRS")
        self.assertEqual(result.envid, "QQ+x=1")
        self.assertEqual(
            dict(result.parameters),
            {
                "SIZE": "1024",
                "BODY": "8bitmime",
                "SMTPUTF8": None,
                "RET": "hdrs",
                "ENVID": "QQ+2Bx+3D1",
            },
        )

    def test_noParametersAfterHelo(self) -> None:
        """
        Without EHLO, ESMTP parameters are refused with 555.
        """
        self.assertEqual(_code(parseMailFrom("FROM:<a@example.com> SIZE=1", esmtp=False)), 555)
        self.assertIsInstance(parseMailFrom("FROM:<a@example.com>", esmtp=False), MailFrom)

    def test_extraParameters(self) -> None:
        """
        Keywords an extension handles pass through unchecked.
        """
        result = parseMailFrom("FROM:<a@example.com> AUTH=<>", extraParameters=frozenset({"AUTH"}))
        assert isinstance(result, MailFrom)
        self.assertEqual(result.parameters["AUTH"], "<>")

    def test_pathLength(self) -> None:
        """
        A path longer than 256 octets (RFC 5321 4.5.3.1.3) is refused.
        """
        route = ",".join(["@" + "r" * 60 + ".example"] * 4)
        result = parseMailFrom(f"FROM:<{route}:a@example.com>")
        self.assertEqual(_code(result), 501)


class RcptToTests(SynchronousTestCase):
    def test_relayTricks(self) -> None:
        """
        The classic relay tricks parse as local parts at the last domain,
        and a source route is stripped so that the real mailbox is routed.
        """
        cases: list[tuple[str, Address]] = [
            ("TO:<user%other.example@example.org>", Address("user%other.example", "example.org")),
            ('TO:<"user@other.example"@example.org>', Address('"user@other.example"', "example.org")),
            ("TO:<other.example!user@example.org>", Address("other.example!user", "example.org")),
            ("TO:<@example.org:user@other.example>", Address("user", "other.example")),
        ]
        for argument, address in cases:
            result = parseRcptTo(argument, HOST)
            assert isinstance(result, RcptTo), argument
            self.assertEqual(result.address, address, argument)
            self.assertFalse(result.postmaster)

    def test_postmaster(self) -> None:
        """
        Bare C{<postmaster>}, in any case, is postmaster at the server's
        name; with a source route or a domain it is an ordinary address.
        """
        for spelling in ("postmaster", "Postmaster", "POSTMASTER"):
            result = parseRcptTo(f"TO:<{spelling}>", "MX.Example.org")
            assert isinstance(result, RcptTo)
            self.assertTrue(result.postmaster)
            self.assertEqual(result.address, Address("postmaster", "mx.example.org"))
        result = parseRcptTo("TO:<postmaster@example.org>", HOST)
        assert isinstance(result, RcptTo)
        self.assertFalse(result.postmaster)
        self.assertEqual(_code(parseRcptTo("TO:<@a.example:postmaster>", HOST)), 501)

    def test_errors(self) -> None:
        """
        Each malformed RCPT argument gets the right code.
        """
        cases: list[tuple[str, int]] = [
            ("TO:<>", 501),
            ("TO:", 501),
            ("FROM:<a@example.org>", 501),
            ("TO:user@example.org", 501),
            ("TO:<user>", 501),
            ("TO:<ü@example.org>", 553),
            ("TO:<a@example.org> NOTIFY=SOMETIMES", 501),
            ("TO:<a@example.org> NOTIFY=NEVER,SUCCESS", 501),
            ("TO:<a@example.org> NOTIFY=SUCCESS,SUCCESS", 501),
            ("TO:<a@example.org> NOTIFY", 501),
            ("TO:<a@example.org> ORCPT=rfc822", 501),
            ("TO:<a@example.org> ORCPT=rfc822;", 501),
            ("TO:<a@example.org> ORCPT=rfc822;a+0Ab", 501),
            ("TO:<a@example.org> ORCPT=bad(type);a", 501),
            ("TO:<a@example.org> ORCPT=utf-8;\\x{D800}", 501),
            ("TO:<a@example.org> ORCPT=utf-8;\\x{41}", 501),
            ("TO:<a@example.org> ORCPT=utf-8;ü@x", 501),
            ("TO:<a@example.org> SIZE=10", 555),
        ]
        for argument, code in cases:
            self.assertEqual(_code(parseRcptTo(argument, HOST)), code, argument)

    def test_dsnParameters(self) -> None:
        """
        NOTIFY values are upper-cased; ORCPT is xtext-decoded (RFC 3461) or,
        for the utf-8 type, has its C{\\x{...}} escapes decoded (RFC 6533).
        """
        result = parseRcptTo("TO:<a@example.org> notify=success,Delay ORCPT=rfc822;a+2Bb@example.org", HOST)
        assert isinstance(result, RcptTo)
        self.assertEqual(result.notify, frozenset({"SUCCESS", "DELAY"}))
        self.assertEqual(result.orcpt, "rfc822;a+b@example.org")
        result = parseRcptTo("TO:<a@example.org> ORCPT=utf-8;\\x{FC}ber@example.org", HOST)
        assert isinstance(result, RcptTo)
        self.assertEqual(result.orcpt, "utf-8;über@example.org")
        result = parseRcptTo("TO:<ü@example.org> ORCPT=utf-8;ü@example.org", HOST, smtputf8=True)
        assert isinstance(result, RcptTo)
        self.assertEqual(result.orcpt, "utf-8;ü@example.org")
        self.assertEqual(result.address, Address("ü", "example.org"))

    def test_smtputf8Recipient(self) -> None:
        """
        A UTF-8 recipient is allowed only in an SMTPUTF8 transaction.
        """
        self.assertEqual(_code(parseRcptTo("TO:<δ@παράδειγμα.example>", HOST)), 553)
        result = parseRcptTo("TO:<δ@παράδειγμα.example>", HOST, smtputf8=True)
        assert isinstance(result, RcptTo)
        self.assertEqual(result.address.localpart, "δ")


class XtextTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """
        L{encodeXtext} and L{decodeXtext} are inverses, also for UTF-8.
        """
        for text in ("plain", "a+b=c", "über", "<x@y>", "!~"):
            self.assertEqual(decodeXtext(encodeXtext(text)), text)
        self.assertEqual(encodeXtext("a+b=c d"), "a+2Bb+3Dc+20d")

    def test_invalid(self) -> None:
        """
        Bad escapes, raw specials, broken UTF-8 and controls are refused.
        """
        for text in ("a+", "a+G0", "a=b", "a b", "+FF", "+0D", "\x01"):
            self.assertRaises(ValueError, decodeXtext, text)


class BdatTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        C{BDAT size [LAST]}, LAST in any case; anything else is 501.
        """
        self.assertEqual(parseBdat("0"), BdatCommand(0, False))
        self.assertEqual(parseBdat("100 LAST"), BdatCommand(100, True))
        self.assertEqual(parseBdat("7 last"), BdatCommand(7, True))
        for bad in ("", "LAST", "-1", "1 FIRST", "1LAST", "x", "1 LAST x", "9" * 21):
            self.assertEqual(_code(parseBdat(bad)), 501, bad)
