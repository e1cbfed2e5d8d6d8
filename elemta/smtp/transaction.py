"""The mail transaction of a session: MAIL, RCPT, DATA and BDAT up to the queue's answer.

A part of smtp/session.py's Session, held as session.mail, with the transaction's own state
(the envelope, the DATA reader, the BDAT chunks); the session owns the input loop and hands it
the message text.  What it reads of the session, and the session's methods it answers with,
are parts.SessionView.
"""

from __future__ import annotations

import secrets

from elemta import log as logmod
from elemta import metrics
from elemta.errors import QueueFullError
from elemta.plugins import api
from elemta.queue.model import NewMessage
from elemta.smtp import address as addr
from elemta.smtp import dotreader, policy, replies
from elemta.smtp import envelope as env
from elemta.smtp.context import BDAT_CHUNK, COMMAND, DATA, WAIT_QUEUE, Enqueue, Output
from elemta.smtp.parts import SessionView
from elemta.smtp.replies import Reply


class MailTransaction:
    def __init__(self, session: SessionView):
        self.session = session
        self.envelope: env.Envelope | None = None  # from MAIL on
        self.data: dotreader.DataReader | None = None  # reading DATA
        self.chunks: list[bytes] = []  # the BDAT chunks of the message so far
        self.chunk: dotreader.Chunk | None = None  # the BDAT chunk being read

    def reset(self) -> None:
        """RFC 5321 §4.1.1.5: RSET (and a new EHLO, STARTTLS) forget the transaction."""
        self.envelope, self.data, self.chunks = None, None, []
        self.session.hooks.end_transaction()

    def enqueued(self, message: NewMessage) -> list[Output]:
        """The queue committed message: the 250 that promises it."""
        s = self.session
        queue_id = message.queue_id
        s.services.log(
            "queued", qid=queue_id, size=len(message.body), nrcpt=len(message.recipients),
            priority=message.priority, state="held" if message.hold else "queued",
        )
        s.hooks.notice("on_enqueue")
        metrics.count_reply(s.verb, 250, "2.0.0")
        return s.after_queue(replies.QUEUED.format(queue_id=queue_id))

    def enqueue_failed(self, error: Exception) -> list[Output]:
        s = self.session
        reply = replies.NO_STORAGE if isinstance(error, QueueFullError) else replies.QUEUE_FAILED
        qid = self.envelope.queue_id if self.envelope else None
        s.services.log(
            "queue_error", qid=qid, level=logmod.WARNING, error=str(error) or type(error).__name__
        )
        metrics.count_reply(s.verb, reply.code, reply.enhanced)
        return s.after_queue(reply)

    def mail(self, arg: str) -> list[Output]:
        s = self.session
        if s.helo is None:
            return s.out_of_sequence("send HELO/EHLO first")
        if self.envelope is not None:
            return s.out_of_sequence("nested MAIL command")
        try:
            path, rest = addr.split_command_arg(arg, "FROM")
            params = addr.parse_params(rest, env.MAIL_PARAMS)
            if params and not s.esmtp:
                raise addr.AddressError("param", "parameters need EHLO")
            smtputf8 = "SMTPUTF8" in params
            if "REQUIRETLS" in params and s.tls is None:
                return s.error(replies.REQUIRETLS_NEEDS_TLS)
            sender = addr.parse_path(path, smtputf8=smtputf8, allow_null=True, allow_postmaster=False)
            envelope = env.from_mail(
                sender, params, max_size=s.settings.max_message_size, trusted=s.client.trusted
            )
        except addr.AddressError as exc:
            return self._address_error(exc, replies.BAD_SENDER)
        except env.TooBig:
            return s.error(replies.SIZE_EXCEEDED.format(limit=s.settings.max_message_size))
        if s.settings.submission:
            refusal = self._submission_refusal(sender)
            if refusal is not None:
                self._log_mail_refusal(sender, refusal)
                return s.error(refusal)
        guard = s.services.guard
        if guard is not None and not s.client.trusted:
            size = addr.parse_size(params["SIZE"]) if params.get("SIZE") else 0
            refusal = guard.mail(s.client, str(sender), s.user, size)
            if refusal is not None:
                self._log_mail_refusal(sender, refusal)
                return [refusal]
        why = s.services.intake_check()
        if why is not None:
            s.services.log("reject", ip=s.client.ip, conn=s.client.conn, reason=why, reply="452 4.3.1")
            return [replies.NO_STORAGE]
        envelope.queue_id = s.services.new_id()  # as Postfix, the ID exists from MAIL on
        s.hooks.begin_transaction(envelope.queue_id, str(sender))
        refusal = s.hooks.refusal("on_mail_from")
        if refusal is not None:
            s.hooks.notes = None
            self._log_mail_refusal(sender, refusal)
            return s.error(refusal)
        self.envelope = envelope
        s.services.log(
            "mail", qid=envelope.queue_id, ip=s.client.ip, conn=s.client.conn, sender=f"<{sender}>",
            size=params.get("SIZE") or "-", body=envelope.body_type,
            **({"requiretls": True} if envelope.requiretls else {}),
        )
        return [replies.SENDER_OK]

    def _submission_refusal(self, sender: addr.Address) -> Reply | None:
        """RFC 6409 §4.3 and §6.1: who may submit, and with which envelope senders."""
        s = self.session
        if s.user is None:
            locked = s.settings.auth_required and not (s.client.trusted or s.settings.accept_all)
            return replies.AUTH_REQUIRED if locked else None
        if sender.is_null or policy.sender_allowed(s.user, str(sender), s.settings.sender_logins or {}):
            return None
        return replies.SENDER_NOT_OWNED.format(user=s.user)

    def _log_mail_refusal(self, sender: addr.Address, refusal: Reply) -> None:
        s = self.session
        s.services.log("reject", ip=s.client.ip, conn=s.client.conn, sender=f"<{sender}>",
                          user=s.user or "-", reply=f"{refusal.code} {refusal.enhanced}")

    def _address_error(self, exc: addr.AddressError, syntax_reply: Reply) -> list[Output]:
        s = self.session
        if exc.kind == "utf8":
            return s.error(replies.UTF8_REQUIRED)
        if exc.kind == "unknown_param":
            return s.error(replies.UNKNOWN_PARAMETER.format(name=str(exc)[:32]))
        if exc.kind == "param":
            return s.error(replies.BAD_PARAMETER.format(why=str(exc)))
        return s.error(syntax_reply.format(why=str(exc)))

    def rcpt(self, arg: str) -> list[Output]:
        s = self.session
        if self.envelope is None:
            return s.out_of_sequence("send MAIL first")
        if len(self.envelope.recipients) >= s.settings.max_recipients:
            return [replies.TOO_MANY_RECIPIENTS]
        try:
            path, rest = addr.split_command_arg(arg, "TO")
            params = addr.parse_params(rest, env.RCPT_PARAMS)
            if params and not s.esmtp:
                raise addr.AddressError("param", "parameters need EHLO")
            rcpt = addr.parse_path(
                path, smtputf8=self.envelope.smtputf8, allow_null=False, allow_postmaster=True
            )
            new_rcpt = env.recipient(self._postmaster_of_this_host(rcpt), params)
        except addr.AddressError as exc:
            return self._address_error(exc, replies.BAD_RECIPIENT)
        table = s.settings.recipients
        unknown = table is not None and not s.settings.accept_all and not table.accepts(str(rcpt))
        refusal = replies.RELAY_DENIED if not self._may_receive(rcpt) else replies.NO_SUCH_USER if unknown else None
        guard = s.services.guard
        if refusal is None and guard is not None and not s.client.trusted:
            refusal = guard.rcpt(s.client, s.user)
        if refusal is None and s.hooks.notes is not None:
            refusal = s.hooks.refusal("on_rcpt_to", recipient=str(rcpt))
        if refusal is not None:
            s.services.log("reject", qid=self.envelope.queue_id, ip=s.client.ip, conn=s.client.conn,
                              rcpt=f"<{rcpt}>", reply=f"{refusal.code} {refusal.enhanced}")
            return s.error(refusal)
        self.envelope.add_recipient(new_rcpt)
        if s.hooks.notes is not None:
            s.hooks.notes.transaction.recipients.append(str(rcpt))
        s.services.log("rcpt", qid=self.envelope.queue_id, rcpt=f"<{rcpt}>")
        return [replies.RCPT_OK]

    def _may_receive(self, rcpt: addr.Address) -> bool:
        """Relay control (smtp/policy.py): who may send to this recipient here."""
        s = self.session
        decision = policy.may_relay(
            rcpt, role=s.settings.role, authenticated=s.user is not None,
            trusted=s.client.trusted, accept_all=s.settings.accept_all,
            auth_required=s.settings.auth_required, local_domains=s.settings.local_domains,
            relay_domains=s.settings.relay_domains,
        )
        return decision.allowed

    def _postmaster_of_this_host(self, rcpt: addr.Address) -> addr.Address:
        """RFC 5321 §4.1.1.3: the bare <Postmaster> is this host's postmaster.  It is queued
        under the first local domain (whose postmaster@ always resolves, local.py), else the
        host's name, so delivery never routes it as a domain called "postmaster"."""
        s = self.session
        if rcpt.domain:
            return rcpt
        domain = min(s.settings.local_domains, default="") or s.settings.hostname.lower()
        return addr.Address("postmaster", domain, domain)

    def data_cmd(self, arg: str) -> list[Output]:
        s = self.session
        if arg:
            return s.syntax_error("DATA")
        problem = self._transaction_problem()
        if problem:
            return s.out_of_sequence(problem)
        if self.chunks:
            return s.out_of_sequence("DATA after BDAT")
        if s.input_pending():
            # RFC 2920 §3.1: DATA ends a pipelined group; text sent before the 354 means the
            # client is not waiting for replies, so nothing it sends can be trusted as a message.
            return s.input_before_reply()
        refusal = s.hooks.refusal("on_data")
        if refusal is not None:
            return s.error(refusal)
        s.enter(DATA)
        self.data = dotreader.DataReader(s.settings.max_message_size)
        return [replies.START_DATA]

    def _transaction_problem(self) -> str | None:
        s = self.session
        if s.helo is None:
            return "send HELO/EHLO first"
        if self.envelope is None:
            return "send MAIL first"
        if not self.envelope.recipients:
            return "send RCPT first"
        return None

    def end_of_data(self, text: bytes) -> list[Output]:
        s = self.session
        s.enter(COMMAND)
        data = self.data
        assert data is not None  # DATA was being read
        if data.too_big:
            self._log_refusal("552 5.3.4", size=data.received)
            self.reset()
            return s.error(replies.SIZE_EXCEEDED.format(limit=s.settings.max_message_size))
        return self._finish(text)  # unstuffed by the reader

    # BDAT (RFC 3030): the chunk's octets follow the command line; they are data, never
    # commands, whatever the state of the transaction, so they are always read in full.
    def bdat(self, arg: str) -> list[Output]:
        s = self.session
        parts = arg.split(" ")
        # RFC 3030 §2: chunk-size = 1*DIGIT, and DIGIT is 0-9 only (RFC 5234 Appendix B.1);
        # str.isdigit() alone also takes "²" (which int() refuses) and "٣" (which it reads as 3).
        size_ok = parts[0].isascii() and parts[0].isdigit()
        if not size_ok or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            return s.syntax_error("BDAT size [LAST]")
        size, problem = int(parts[0]), self._transaction_problem()
        refusal = replies.BAD_SEQUENCE.format(why=problem) if problem else None
        if refusal is None and sum(map(len, self.chunks)) + size > s.settings.max_message_size:
            refusal = replies.SIZE_EXCEEDED.format(limit=s.settings.max_message_size)
        if refusal is None and not self.chunks and s.hooks.notes is not None and not s.hooks.notes.data_seen:
            refusal = s.hooks.refusal("on_data")
            s.hooks.notes.data_seen = refusal is None  # passed once: not asked again per chunk
        self.chunk = dotreader.Chunk(size, last=len(parts) == 2, refusal=refusal)
        s.enter(BDAT_CHUNK)
        return []

    def end_of_chunk(self) -> list[Output]:
        s = self.session
        s.enter(COMMAND)
        chunk, self.chunk = self.chunk, None
        assert chunk is not None  # a BDAT chunk was being read
        if chunk.refusal is not None:
            if chunk.refusal.code == 552:
                self._log_refusal("552 5.3.4")
                self.reset()
            return s.error(chunk.refusal)
        self.chunks.append(chunk.data())
        if not chunk.last:
            return [replies.CHUNK_OK.format(size=len(self.chunks[-1]))]
        text = b"".join(self.chunks)
        self.chunks = []
        return self._finish(text)

    def _finish(self, text: bytes) -> list[Output]:
        """The whole message text is here: check it, add Received, hand it to the queue."""
        s = self.session
        refusal = dotreader.check_text(text)
        if refusal is None:
            hops = dotreader.count_received(text)
            if hops >= s.settings.max_received_headers:
                refusal = replies.LOOP.format(count=hops)
        if refusal is not None:
            self._log_refusal(f"{refusal.code} {refusal.enhanced}")
            self.reset()
            return s.error(refusal)
        envelope, notes = self.envelope, s.hooks.notes
        assert envelope is not None  # the text ends a transaction that MAIL began
        if s.settings.submission:
            text = self._complete_header(text)
        if notes is not None:
            refusal = s.hooks.refusal("on_message", message=api.Message(text))
            if refusal is not None:
                self._log_refusal(f"{refusal.code} {refusal.enhanced}", plugin="yes")
                self.reset()
                return s.error(refusal)
        text = s.hooks.message_edits(text, envelope.queue_id)
        if notes is not None and notes.discard:
            s.services.log("discarded", qid=envelope.queue_id, plugin=notes.discard, size=len(text),
                              nrcpt=len(envelope.recipients))
            return s.after_queue(replies.QUEUED.format(queue_id=envelope.queue_id))
        if s.services.guard is not None and not s.client.trusted:
            s.services.guard.message(s.client, len(text))
        message = NewMessage(
            queue_id=envelope.queue_id,
            sender=str(envelope.sender),
            recipients=tuple(envelope.recipients),
            body=env.received_header(
                envelope, helo=s.helo or "", client_ip=s.client.ip, esmtp=s.esmtp,
                hostname=s.settings.hostname, now=s.services.now(),
                tls=s.tls, authenticated=s.user is not None,
            ) + text,
            priority=(notes.priority if notes is not None and notes.priority else envelope.priority),
            hold=s.settings.hold or bool(notes is not None and notes.quarantine),
            envid=envelope.envid,
            ret=envelope.ret,
            body_type=envelope.body_type,
            smtputf8=envelope.smtputf8,
            requiretls=envelope.requiretls,
            client_ip=s.client.ip,
            client_helo=s.helo or "",
            listener=s.settings.listener,
            received_at=s.services.now(),
        )
        if notes is not None and notes.quarantine:
            s.services.log("quarantined", qid=envelope.queue_id, reason=notes.quarantine)
        s.enter(WAIT_QUEUE)
        return [Enqueue(message)]

    def _complete_header(self, text: bytes) -> bytes:
        """RFC 6409 §8.1 and §8.3: a submission server adds Date and Message-ID when the
        client left them out (RFC 5322 §3.6 requires Date; Message-ID SHOULD be there)."""
        s = self.session
        added = b""
        if not dotreader.has_field(text, b"date"):
            added += b"Date: " + env.date_field(s.services.now()).encode() + b"\r\n"
        if not dotreader.has_field(text, b"message-id"):
            assert self.envelope is not None  # called by _finish, inside a transaction
            unique = f"{self.envelope.queue_id}.{secrets.token_hex(6)}"
            added += f"Message-ID: <{unique}@{s.settings.hostname}>\r\n".encode()
        return added + text

    def _log_refusal(self, reply: str, **fields) -> None:
        s = self.session
        qid = self.envelope.queue_id if self.envelope else None
        s.services.log("reject", qid=qid, ip=s.client.ip, conn=s.client.conn, reply=reply, **fields)

