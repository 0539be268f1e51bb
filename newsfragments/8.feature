ETRN (RFC 1985) with rights per client network and per user, domains held until ETRN, and a rate limit; TURN is refused.
