from twisted.application.service import ServiceMaker

mailfw = ServiceMaker(
    "mailfw",
    "mailfw.tap",
    "A pluggable SMTP, submission and ETRN mail server.",
    "mailfw",
)
