"""
mailfw-webhook: an example third-party delivery plugin for mailfw.

It registers the delivery plugin C{webhook}, which POSTs each message to an
HTTP endpoint (see L{mailfw_webhook._agent}).  Nothing here is imported
when Twisted scans for plugins: the dropin in C{twisted/plugins/} names
L{mailfw_webhook._agent.fromConfig} as text and mailfw imports it only when
a configuration selects C{plugin = "webhook"}.
"""
