"""Every SMTP reply elemta sends, as data: code, enhanced status code (RFC 3463) and text.

RFC 2034 §3 puts an enhanced status code on every reply except the 220 greeting and the
replies to HELO/EHLO; intermediate replies (354) carry none either, as Postfix does.  Texts
are fixed here so operators can grep for them; `{name}` fields are filled per use.
"""

from __future__ import annotations

from elemta.reply import Reply

__all__ = ["Reply"]  # and the replies below


# Connection level
GREETING = Reply(220, "", "{host} ESMTP elemta")
BYE = Reply(221, "2.0.0", "Bye")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{host} Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "{host} Too many connections from your address")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{host} Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "{host} Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "{host} Service shutting down, closing connection")
# RFC 2920 §3.1 and RFC 5321 §4.3.1: input the server has not asked for yet.
SYNC_ERROR = Reply(554, "5.5.0", "SMTP synchronization error: input before reply")
# Cross-protocol attacks: an HTTP request sent to an SMTP port.
NOT_HTTP = Reply(502, "5.5.1", "This is an SMTP server, not an HTTP proxy")

# Greeting and simple commands
EHLO = Reply(250, "", "{lines}")
HELO = Reply(250, "", "{host}")
OK = Reply(250, "2.0.0", "Ok")
HELP = Reply(214, "2.0.0", "Commands: {commands}\nSee RFC 5321; report problems to postmaster")
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN = Reply(502, "5.5.1", "EXPN is not available")

# Transaction
SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
CHUNK_OK = Reply(250, "2.0.0", "Ok: {size} octets received")

# Order and syntax (RFC 5321 §4.2.4, §4.3.2)
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
COMMAND_TOO_LONG = Reply(500, "5.5.2", "Line too long")
SYNTAX = Reply(501, "5.5.4", "Syntax: {usage}")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands: {why}")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax: {why}")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax: {why}")
UTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
BAD_PARAMETER = Reply(501, "5.5.4", "Bad parameter: {why}")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter {name}")

# Policy and limits
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed limit of {limit} octets")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
NO_SUCH_USER = Reply(550, "5.1.1", "Recipient address rejected: no such user here")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
LOOP = Reply(554, "5.4.6", "Too many Received headers ({count}): mail loop")

# Message content (checked after the real end of data, never before)
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message refused: bare CR or LF (RFC 5321 2.3.8)")
TEXT_LINE_TOO_LONG = Reply(500, "5.6.0", "Message refused: line longer than 1000 octets")

# STARTTLS (RFC 3207 §4)
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_UNAVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
# RFC 8689 §2: REQUIRETLS is offered only over TLS; X.7.10 "encryption needed" (RFC 5248).
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs TLS: send STARTTLS first")

# AUTH (RFC 4954 §4, §6)
AUTH_CHALLENGE = Reply(334, "", "{text}")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response (base64)")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_TOO_MANY = Reply(421, "4.7.0", "{host} Too many failed authentications, try again later")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user {user}")

# Flood protection: which limit, so the client's admin can tell (nothing accepted is lost)
CONNECTION_RATE = Reply(421, "4.7.0", "{host} Too many connections from your address per minute")
RATE_LIMITED = Reply(450, "4.7.1", "Rate limit reached: {limit}, try again later")
RCPT_RATE_LIMITED = Reply(452, "4.7.1", "Rate limit reached: {limit}, try again later")

# Storage
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
QUEUE_FAILED = Reply(451, "4.3.0", "Local error in processing, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
