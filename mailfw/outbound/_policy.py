"""
The one question of outbound trust: "what TLS must this next hop have?"

L{TLSPolicyResolver.policyFor} answers it for a next hop and its resolved
mail hosts, composing in this order (ARCHITECTURE.md, "Outbound trust is
one question"):

  1. B{DANE} (RFC 7672): authenticated, usable TLSA records for a host
     make that host's certificate checked against them; DANE beats
     MTA-STS when both exist (RFC 8461 2);
  2. B{MTA-STS} (RFC 8461): an C{enforce} policy allows only the listed
     MX hosts, with a certificate valid for their names; C{testing} only
     logs (except for REQUIRETLS mail: RFC 8689 4.2.1);
  3. B{the policy table}: the agent's C{tls} level and its per-destination
     C{tls_policy} entries (C{none}, C{may}, C{encrypt}, C{verify}, and
     C{dane} or C{mta-sts}, which make that mechanism mandatory: without
     it published the mail waits), used when neither is published;
  4. B{REQUIRETLS} (RFC 8689): a message that asks for it may only leave
     for a host whose certificate is verified (DANE, MTA-STS or
     C{verify}) and that offers REQUIRETLS itself, else it bounces (with
     the enhanced code 5.7.30).

A C{TLS-Required: No} header (RFC 8689 5) switches 1 and 2 off for that
message: the table's level, at most opportunistic.

Everything a lookup or fetch can get wrong ends in this module as a
logged reason and a value; enforcement failures defer (4.7.x), they never
bounce at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns

from mailfw.outbound._dane import (
    TLSA,
    TLSA_TYPE,
    DNSFailure,
    DNSSECResolver,
    TLSALookup,
    tlsaRecords,
)
from mailfw.outbound._mtasts import STSPolicies, STSPolicy
from mailfw.reply import SMTPReply
from mailfw.routing._mx import MailHost

__all__ = [
    "POLICY_LEVELS",
    "REQUIRETLS_FAILED",
    "HostTLS",
    "TLSPolicy",
    "TLSPolicyResolver",
]

log = Logger()

#: What C{tls} and C{tls_policy} entries may say; C{"auto"} (the default)
#: is DANE if published, else MTA-STS if published, else C{may}.
POLICY_LEVELS = ("auto", "none", "may", "encrypt", "verify", "dane", "mta-sts")

REQUIRETLS_FAILED = SMTPReply(
    550, "5.7.30", "REQUIRETLS: no next hop with verified TLS that offers REQUIRETLS"
)


@dataclass(frozen=True)
class HostTLS:
    """
    What TLS one mail host must have.

    @ivar level: C{none}, C{may}, C{encrypt}, C{verify} (PKIX, certificate
        valid for the host name) or C{dane} (checked against C{tlsa}).
    @ivar tlsa: the usable TLSA records, for C{dane}.
    @ivar names: the names a DANE-TA chain may be issued for (the host,
        then the next hop domain, RFC 7672 3.2.2).
    @ivar refusal: this host may not be used now (not in an enforced
        MTA-STS policy, TLSA lookup failed, no verified TLS for
        REQUIRETLS); the reply to record if no host is usable.
    @ivar policyType: for TLS reporting (RFC 8460): C{"tlsa"}, C{"sts"} or
        C{"no-policy-found"}.
    """

    level: str
    tlsa: tuple[TLSA, ...] = ()
    names: tuple[str, ...] = ()
    refusal: SMTPReply | None = None
    policyType: str = "no-policy-found"

    @property
    def verified(self) -> bool:
        """
        Whether the peer's certificate is authenticated at this level.
        """
        return self.level in ("verify", "dane")


@dataclass(frozen=True)
class TLSPolicy:
    """
    The answer for one next hop.

    @ivar source: where it came from: C{"dane"}, C{"mta-sts"},
        C{"table"} or C{"opt-out"} (a C{TLS-Required: No} header).
    @ivar why: one line for logs and C{mailfw route}.
    @ivar level: the level of hosts without an entry in C{hosts}.
    @ivar hosts: per mail host name (DANE and MTA-STS decide per host).
    @ivar failure: nobody should be contacted: the reply for every
        recipient (a mandatory mechanism missing: 4.7.x; REQUIRETLS that
        cannot be met: 5.7.30).
    @ivar sts: the MTA-STS policy, when there is one.
    @ivar requireTLS: the message carries REQUIRETLS: hosts without
        verified TLS are refused with 5.7.30.
    """

    source: str
    why: str
    level: str = "may"
    hosts: Mapping[str, HostTLS] = field(default_factory=dict)
    failure: SMTPReply | None = None
    sts: STSPolicy | None = None
    requireTLS: bool = False

    def forHost(self, name: str) -> HostTLS:
        """
        What the host C{name} must have (with a refusal when it may not be
        used for this message).
        """
        host = self.hosts.get(name) or HostTLS(self.level, names=(name,))
        if self.requireTLS and not host.verified and host.refusal is None:
            host = replace(host, refusal=REQUIRETLS_FAILED)
        return host


class TLSPolicyResolver:
    """
    Answers L{TLSPolicy} questions for one C{smtp-relay} instance.

    @ivar level: the instance's C{tls} (one of L{POLICY_LEVELS}).
    @ivar table: per next hop (a domain, or C{[host]}) overrides of it.
    @ivar dnssec: the validating resolver for DANE, or C{None} when
        C{[dns] dnssec} is not C{"trust-ad"} (then DANE is never used).
    @ivar sts: the MTA-STS policies, or C{None} to never use MTA-STS.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        level: str = "auto",
        table: Mapping[str, str] | None = None,
        dnssec: DNSSECResolver | Any = None,
        sts: STSPolicies | None = None,
    ) -> None:
        self.clock = clock
        self.level = level
        self.table = dict(table or {})
        self.dnssec = dnssec
        self.sts = sts

    def configuredLevel(self, nexthop: str) -> tuple[str, str]:
        """
        The table's level for C{nexthop}, and where it comes from.
        """
        key = nexthop.lower()
        if key in self.table:
            return self.table[key], f"tls_policy entry {nexthop!r}"
        bare = key.rsplit(":", 1)[0] if key.startswith("[") else key
        if bare in self.table:
            return self.table[bare], f"tls_policy entry {bare!r}"
        return self.level, "the agent's tls setting"

    def policyFor(
        self,
        nexthop: str,
        hosts: Sequence[MailHost],
        port: int = 25,
        requireTLS: bool = False,
        optOut: bool = False,
    ) -> Deferred[TLSPolicy]:
        """
        Decide the TLS for C{nexthop}, whose mail hosts are C{hosts}.

        @param port: the port the hosts are contacted on (TLSA names
            include it).
        @param requireTLS: the message carries REQUIRETLS.
        @param optOut: the message has C{TLS-Required: No}.
        @return: a L{Deferred} firing with a L{TLSPolicy}; never fails.
        """
        return Deferred.fromCoroutine(self._policyFor(nexthop, tuple(hosts), port, requireTLS, optOut))

    async def _policyFor(
        self, nexthop: str, hosts: tuple[MailHost, ...], port: int, requireTLS: bool, optOut: bool
    ) -> TLSPolicy:
        level, where = self.configuredLevel(nexthop)
        policy = await self._compose(nexthop, hosts, port, level, where, optOut and not requireTLS)
        if requireTLS:
            policy = _forRequireTLS(policy)
        return policy

    async def _compose(
        self, nexthop: str, hosts: tuple[MailHost, ...], port: int, level: str, where: str, optOut: bool
    ) -> TLSPolicy:
        fixed = nexthop.startswith("[")
        domain = nexthop[1:].split("]", 1)[0] if fixed else nexthop.lower().rstrip(".")
        if optOut:
            chosen = level if level in ("none", "may") else "may"
            return TLSPolicy("opt-out", f"TLS-Required: No header: {chosen}", chosen)
        if level not in ("auto", "dane", "mta-sts"):
            return TLSPolicy("table", f"{level} ({where})", level)

        if level in ("auto", "dane"):
            dane = await self._dane(domain, hosts, port, fixed)
            if dane is not None:
                return dane
            if level == "dane":
                why = "DANE required by " + where + " but no authenticated TLSA records"
                if self.dnssec is None:
                    why += ' ([dns] dnssec = "trust-ad" is not set)'
                return TLSPolicy("table", why, "dane", failure=SMTPReply(451, "4.7.5", why[:300]))
        if level in ("auto", "mta-sts") and not fixed and self.sts is not None:
            sts = await self.sts.policyFor(domain)
            if sts is not None:
                return _fromSTS(sts, hosts)
            if level == "mta-sts":
                why = f"MTA-STS required by {where} but {domain} publishes no usable policy"
                return TLSPolicy("table", why, "mta-sts", failure=SMTPReply(451, "4.7.5", why[:300]))
        return TLSPolicy("table", f"may (no DANE or MTA-STS published; {where})", "may")

    async def _dane(
        self, domain: str, hosts: tuple[MailHost, ...], port: int, fixed: bool
    ) -> TLSPolicy | None:
        if self.dnssec is None or not hosts:
            return None
        if not fixed:
            # RFC 7672 2.2.1: DANE needs the MX records themselves signed.
            try:
                mx = await self.dnssec.query(domain, dns.MX)
            except DNSFailure as e:
                self.log.info("DNSSEC MX lookup for {nexthop} failed: {why}", nexthop=domain, why=str(e))
                return None
            if not mx.authenticated:
                return None
        perHost: dict[str, HostTLS] = {}
        anyDANE = False
        for name in dict.fromkeys(h.name for h in hosts):
            if _isAddress(name):
                continue  # no TLSA names under an address literal
            lookup = await self._tlsa(name, port, domain)
            names = (name,) if fixed or name == domain else (name, domain)
            if lookup.failure is not None:
                reply = SMTPReply(451, "4.7.5", f"TLSA lookup for {name} failed: {lookup.failure}"[:300])
                perHost[name] = HostTLS("dane", names=names, refusal=reply, policyType="tlsa")
                anyDANE = True
            elif lookup.records:
                perHost[name] = HostTLS("dane", lookup.records, names, policyType="tlsa")
                anyDANE = True
            elif lookup.unusable:
                perHost[name] = HostTLS("encrypt", names=names, policyType="tlsa")
                anyDANE = True
        if not anyDANE:
            return None
        described = ", ".join(f"{n}: {h.level}" for n, h in perHost.items())
        return TLSPolicy("dane", f"DANE (authenticated TLSA records; {described})", "may", perHost)

    async def _tlsa(self, host: str, port: int, domain: str) -> TLSALookup:
        name = f"_{port}._tcp.{host}"
        try:
            answer = await self.dnssec.query(name, TLSA_TYPE)
        except DNSFailure as e:
            self.log.warn(
                "TLSA lookup {name} for {nexthop} failed: {why}", name=name, nexthop=domain, why=str(e)
            )
            return TLSALookup(failure=str(e))
        if not answer.authenticated or not answer.records:
            return TLSALookup()
        usable, problems = tlsaRecords(answer)
        for problem in problems:
            self.log.warn(
                "Unusable TLSA record at {name} for {nexthop}: {why}", name=name, nexthop=domain, why=problem
            )
        return TLSALookup(tuple(usable), unusable=not usable)


def _fromSTS(sts: STSPolicy, hosts: Sequence[MailHost]) -> TLSPolicy:
    enforce = sts.mode == "enforce"
    perHost: dict[str, HostTLS] = {}
    for name in dict.fromkeys(h.name for h in hosts):
        if sts.allows(name):
            perHost[name] = HostTLS("verify" if enforce else "may", names=(name,), policyType="sts")
        elif enforce:
            reply = SMTPReply(451, "4.7.5", f"MTA-STS: {name} is not an MX host allowed by the policy")
            perHost[name] = HostTLS("verify", names=(name,), refusal=reply, policyType="sts")
        else:
            log.info(
                "MTA-STS (testing): {host} is not in the policy's mx list; delivering anyway",
                host=name,
            )
            perHost[name] = HostTLS("may", names=(name,), policyType="sts")
    why = f"MTA-STS {sts.mode} (id {sts.id}, mx {' '.join(sts.mx)})"
    return TLSPolicy("mta-sts", why, "verify" if enforce else "may", perHost, sts=sts)


def _forRequireTLS(policy: TLSPolicy) -> TLSPolicy:
    """
    Tighten C{policy} for a REQUIRETLS message: MTA-STS C{testing} counts
    as C{enforce} (RFC 8689 4.2.1), hosts without verified TLS are refused
    (L{TLSPolicy.forHost}), and with no verified host at all nobody is
    contacted (5.7.30).
    """
    if policy.failure is not None:
        return replace(policy, requireTLS=True)
    if policy.source == "mta-sts" and policy.sts is not None and policy.sts.mode != "enforce":
        policy = _fromSTS(replace(policy.sts, mode="enforce"), tuple(MailHost(n, "") for n in policy.hosts))
    policy = replace(policy, requireTLS=True)
    verified = policy.level in ("verify", "dane") or any(
        h.verified and h.refusal is None for h in policy.hosts.values()
    )
    if not verified:
        return replace(policy, why=policy.why + "; REQUIRETLS needs verified TLS", failure=REQUIRETLS_FAILED)
    return policy


def _isAddress(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
