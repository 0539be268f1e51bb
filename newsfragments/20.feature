``[smtp] max_session_time`` (default 3600 seconds) ends a session that lasts too long however busy
the client is, with ``421 4.4.2``: a client sending a byte every few seconds can no longer hold a
connection slot for ever.
