# The dropin: Twisted imports this module on every plugin scan, so it only
# names the factory; mailfw imports mailfw_webhook._agent when configured.
from mailfw.interfaces import IDeliveryAgentFactory
from mailfw.plugin import LazyComponent

webhook = LazyComponent(IDeliveryAgentFactory, "webhook", "mailfw_webhook._agent:fromConfig")
