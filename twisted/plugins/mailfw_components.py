# The components bundled with mailfw, registered exactly as a third-party
# plugin would register its own.  Each entry imports its implementation
# only when a configuration selects it.
from mailfw.interfaces import (
    IDeliveryAgentFactory,
    IMessageQueueFactory,
    IPolicyFactory,
    IRouterFactory,
)
from mailfw.plugin import LazyComponent

sqliteQueue = LazyComponent(IMessageQueueFactory, "sqlite", "mailfw.queue._sqlite:fromConfig")
memoryQueue = LazyComponent(IMessageQueueFactory, "memory", "mailfw.queue._memory:fromConfig")
postgresQueue = LazyComponent(IMessageQueueFactory, "postgresql", "mailfw.queue._postgres:fromConfig")

staticRouter = LazyComponent(IRouterFactory, "static", "mailfw.routing._static:fromConfig")

maildirAgent = LazyComponent(IDeliveryAgentFactory, "maildir", "mailfw.delivery._maildir:fromConfig")
discardAgent = LazyComponent(IDeliveryAgentFactory, "discard", "mailfw.delivery._discard:fromConfig")
pipeAgent = LazyComponent(IDeliveryAgentFactory, "pipe", "mailfw.delivery._pipe:fromConfig")
lmtpAgent = LazyComponent(IDeliveryAgentFactory, "lmtp", "mailfw.delivery._lmtp:fromConfig")
aliasesAgent = LazyComponent(IDeliveryAgentFactory, "aliases", "mailfw.delivery._aliases:fromConfig")
relayAgent = LazyComponent(IDeliveryAgentFactory, "smtp-relay", "mailfw.delivery._relay:fromConfig")
virtualAliasesAgent = LazyComponent(
    IDeliveryAgentFactory, "virtual-aliases", "mailfw.hosting._agent:fromConfig"
)

dkimPolicy = LazyComponent(IPolicyFactory, "dkim", "mailfw.policy._dkim:fromConfig")
dkimSignPolicy = LazyComponent(IPolicyFactory, "dkim-sign", "mailfw.policy._dkimsign:fromConfig")
spfPolicy = LazyComponent(IPolicyFactory, "spf", "mailfw.policy._spf:fromConfig")
dmarcPolicy = LazyComponent(IPolicyFactory, "dmarc", "mailfw.policy._dmarc:fromConfig")
milterPolicy = LazyComponent(IPolicyFactory, "milter", "mailfw.policy._milter:fromConfig")
policyServerPolicy = LazyComponent(IPolicyFactory, "policy-server", "mailfw.policy._policyserver:fromConfig")
limitsPolicy = LazyComponent(IPolicyFactory, "limits", "mailfw.policy._limits:fromConfig")
dnsblPolicy = LazyComponent(IPolicyFactory, "dnsbl", "mailfw.policy._dnsbl:fromConfig")
greylistPolicy = LazyComponent(IPolicyFactory, "greylist", "mailfw.policy._greylist:fromConfig")
basicChecksPolicy = LazyComponent(IPolicyFactory, "basic-checks", "mailfw.policy._basic:fromConfig")
rspamdPolicy = LazyComponent(IPolicyFactory, "rspamd", "mailfw.policy._rspamd:fromConfig")
clamavPolicy = LazyComponent(IPolicyFactory, "clamav", "mailfw.policy._clamav:fromConfig")
