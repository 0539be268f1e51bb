"""
Outbound trust: which TLS a next hop must have (DANE, MTA-STS, the policy
table and REQUIRETLS composed in L{TLSPolicyResolver}), and TLS reporting.
"""

from mailfw.outbound._dane import DNSSECResolver, verifyDANE
from mailfw.outbound._mtasts import STSPolicies, STSPolicy
from mailfw.outbound._policy import POLICY_LEVELS, HostTLS, TLSPolicy, TLSPolicyResolver

__all__ = [
    "POLICY_LEVELS",
    "DNSSECResolver",
    "HostTLS",
    "STSPolicies",
    "STSPolicy",
    "TLSPolicy",
    "TLSPolicyResolver",
    "verifyDANE",
]
