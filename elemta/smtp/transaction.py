"""The mail transaction of a session: MAIL, RCPT, DATA and BDAT up to the queue's answer.

A part of smtp/session.py's Session, which owns the input loop and the session-level commands;
the state these methods read and change, and the session's methods they call, are declared in
parts.py (SessionParts), so a reader (and a type checker) sees the contract.
"""

from __future__ import annotations

import email.utils
import secrets

from elemta import log as logmod
from elemta import metrics
from elemta.errors import QueueFullError
from elemta.plugins import api
from elemta.queue.model import NewMessage
from elemta.smtp import address as addr
from elemta.smtp import dotreader, policy, replies
from elemta.smtp import envelope as env
from elemta.smtp.context import BDAT_CHUNK, COMMAND, DATA, WAIT_QUEUE, Enqueue
from elemta.smtp.parts import SessionParts
from elemta.smtp.replies import Reply


class MailTransaction(SessionParts):
    def enqueued(self, message: NewMessage) -> list:
        """The queue committed message: the 250 that promises it."""
        queue_id = message.queue_id
        self.services.log(
            "queued", qid=queue_id, size=len(message.body), nrcpt=len(message.recipients),
            priority=message.priority, state="held" if message.hold else "queued",
        )
        self._notice("on_enqueue")
        metrics.count_reply(self._verb, 250, "2.0.0")
        return self._after_queue(replies.QUEUED.format(queue_id=queue_id))

    def enqueue_failed(self, error: Exception) -> list:
        reply = replies.NO_STORAGE if isinstance(error, QueueFullError) else replies.QUEUE_FAILED
        qid = self.envelope.queue_id if self.envelope else None
        self.services.log(
            "queue_error", qid=qid, level=logmod.WARNING, error=str(error) or type(error).__name__
        )
        metrics.count_reply(self._verb, reply.code, reply.enhanced)
        return self._after_queue(reply)

    def _mail(self, arg: str) -> list:
        if self.helo is None:
            return self._sequence("send HELO/EHLO first")
        if self.envelope is not None:
            return self._sequence("nested MAIL command")
        try:
            path, rest = addr.split_command_arg(arg, "FROM")
            params = addr.parse_params(rest, env.MAIL_PARAMS)
            if params and not self.esmtp:
                raise addr.AddressError("param", "parameters need EHLO")
            smtputf8 = "SMTPUTF8" in params
            sender = addr.parse_path(path, smtputf8=smtputf8, allow_null=True, allow_postmaster=False)
            envelope = env.from_mail(
                sender, params, max_size=self.settings.max_message_size, trusted=self.client.trusted
            )
        except addr.AddressError as exc:
            return self._address_error(exc, replies.BAD_SENDER)
        except env.TooBig:
            return self._error(replies.SIZE_EXCEEDED.format(limit=self.settings.max_message_size))
        if self.settings.submission:
            refusal = self._submission_refusal(sender)
            if refusal is not None:
                self._log_mail_refusal(sender, refusal)
                return self._error(refusal)
        guard = self.services.guard
        if guard is not None and not self.client.trusted:
            size = addr.parse_size(params["SIZE"]) if params.get("SIZE") else 0
            refusal = guard.mail(self.client, str(sender), self.user, size)
            if refusal is not None:
                self._log_mail_refusal(sender, refusal)
                return [refusal]
        why = self.services.intake_check()
        if why is not None:
            self.services.log("reject", ip=self.client.ip, conn=self.client.conn, reason=why, reply="452 4.3.1")
            return [replies.NO_STORAGE]
        envelope.queue_id = self.services.new_id()  # as Postfix, the ID exists from MAIL on
        self._begin_transaction(envelope.queue_id, str(sender))
        refusal = self._refusal(self._hook("on_mail_from"))
        if refusal is not None:
            self._pnotes = None
            self._log_mail_refusal(sender, refusal)
            return self._error(refusal)
        self.envelope = envelope
        self.services.log(
            "mail", qid=envelope.queue_id, ip=self.client.ip, conn=self.client.conn, sender=f"<{sender}>",
            size=params.get("SIZE") or "-", body=envelope.body_type,
        )
        return [replies.SENDER_OK]

    def _submission_refusal(self, sender: addr.Address) -> Reply | None:
        """RFC 6409 §4.3 and §6.1: who may submit, and with which envelope senders."""
        if self.user is None:
            locked = self.settings.auth_required and not (self.client.trusted or self.settings.accept_all)
            return replies.AUTH_REQUIRED if locked else None
        if sender.is_null or policy.sender_allowed(self.user, str(sender), self.settings.sender_logins or {}):
            return None
        return replies.SENDER_NOT_OWNED.format(user=self.user)

    def _log_mail_refusal(self, sender: addr.Address, refusal: Reply) -> None:
        self.services.log("reject", ip=self.client.ip, conn=self.client.conn, sender=f"<{sender}>",
                          user=self.user or "-", reply=f"{refusal.code} {refusal.enhanced}")

    def _address_error(self, exc: addr.AddressError, syntax_reply: Reply) -> list:
        if exc.kind == "utf8":
            return self._error(replies.UTF8_REQUIRED)
        if exc.kind == "unknown_param":
            return self._error(replies.UNKNOWN_PARAMETER.format(name=str(exc)[:32]))
        if exc.kind == "param":
            return self._error(replies.BAD_PARAMETER.format(why=str(exc)))
        return self._error(syntax_reply.format(why=str(exc)))

    def _rcpt(self, arg: str) -> list:
        if self.envelope is None:
            return self._sequence("send MAIL first")
        if len(self.envelope.recipients) >= self.settings.max_recipients:
            return [replies.TOO_MANY_RECIPIENTS]
        try:
            path, rest = addr.split_command_arg(arg, "TO")
            params = addr.parse_params(rest, env.RCPT_PARAMS)
            if params and not self.esmtp:
                raise addr.AddressError("param", "parameters need EHLO")
            rcpt = addr.parse_path(
                path, smtputf8=self.envelope.smtputf8, allow_null=False, allow_postmaster=True
            )
            new_rcpt = env.recipient(self._postmaster_of_this_host(rcpt), params)
        except addr.AddressError as exc:
            return self._address_error(exc, replies.BAD_RECIPIENT)
        table = self.settings.recipients
        unknown = table is not None and not self.settings.accept_all and not table.accepts(str(rcpt))
        refusal = replies.RELAY_DENIED if not self._may_receive(rcpt) else replies.NO_SUCH_USER if unknown else None
        guard = self.services.guard
        if refusal is None and guard is not None and not self.client.trusted:
            refusal = guard.rcpt(self.client, self.user)
        if refusal is None and self._pnotes is not None:
            refusal = self._refusal(self._hook("on_rcpt_to", recipient=str(rcpt)))
        if refusal is not None:
            self.services.log("reject", qid=self.envelope.queue_id, ip=self.client.ip, conn=self.client.conn,
                              rcpt=f"<{rcpt}>", reply=f"{refusal.code} {refusal.enhanced}")
            return self._error(refusal)
        self.envelope.add_recipient(new_rcpt)
        if self._pnotes is not None:
            self._pnotes.transaction.recipients.append(str(rcpt))
        self.services.log("rcpt", qid=self.envelope.queue_id, rcpt=f"<{rcpt}>")
        return [replies.RCPT_OK]

    def _may_receive(self, rcpt: addr.Address) -> bool:
        """Relay control (smtp/policy.py): who may send to this recipient here."""
        decision = policy.may_relay(
            rcpt, role=self.settings.role, authenticated=self.user is not None,
            trusted=self.client.trusted, accept_all=self.settings.accept_all,
            auth_required=self.settings.auth_required, local_domains=self.settings.local_domains,
            relay_domains=self.settings.relay_domains,
        )
        return decision.allowed

    def _postmaster_of_this_host(self, rcpt: addr.Address) -> addr.Address:
        """RFC 5321 §4.1.1.3: the bare <Postmaster> is this host's postmaster.  It is queued
        under the first local domain (whose postmaster@ always resolves, local.py), else the
        host's name, so delivery never routes it as a domain called "postmaster"."""
        if rcpt.domain:
            return rcpt
        domain = min(self.settings.local_domains, default="") or self.settings.hostname.lower()
        return addr.Address("postmaster", domain, domain)

    def _data_cmd(self, arg: str) -> list:
        if arg:
            return self._syntax("DATA")
        problem = self._transaction_problem()
        if problem:
            return self._sequence(problem)
        if self._chunks:
            return self._sequence("DATA after BDAT")
        if self._buf:
            # RFC 2920 §3.1: DATA ends a pipelined group; text sent before the 354 means the
            # client is not waiting for replies, so nothing it sends can be trusted as a message.
            return self.input_before_reply()
        refusal = self._refusal(self._hook("on_data"))
        if refusal is not None:
            return self._error(refusal)
        self._to(DATA)
        self._data = dotreader.DataReader(self.settings.max_message_size)
        return [replies.START_DATA]

    def _transaction_problem(self) -> str | None:
        if self.helo is None:
            return "send HELO/EHLO first"
        if self.envelope is None:
            return "send MAIL first"
        if not self.envelope.recipients:
            return "send RCPT first"
        return None

    def _end_of_data(self, text: bytes) -> list:
        self._to(COMMAND)
        data = self._data
        assert data is not None  # DATA was being read
        if data.too_big:
            self._log_refusal("552 5.3.4", size=data.received)
            self._reset()
            return self._error(replies.SIZE_EXCEEDED.format(limit=self.settings.max_message_size))
        return self._finish(dotreader.unstuff(text))

    # BDAT (RFC 3030): the chunk's octets follow the command line; they are data, never
    # commands, whatever the state of the transaction, so they are always read in full.
    def _bdat(self, arg: str) -> list:
        parts = arg.split(" ")
        # RFC 3030 §2: chunk-size = 1*DIGIT, and DIGIT is 0-9 only (RFC 5234 Appendix B.1);
        # str.isdigit() alone also takes "²" (which int() refuses) and "٣" (which it reads as 3).
        size_ok = parts[0].isascii() and parts[0].isdigit()
        if not size_ok or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            return self._syntax("BDAT size [LAST]")
        size, problem = int(parts[0]), self._transaction_problem()
        refusal = replies.BAD_SEQUENCE.format(why=problem) if problem else None
        if refusal is None and sum(map(len, self._chunks)) + size > self.settings.max_message_size:
            refusal = replies.SIZE_EXCEEDED.format(limit=self.settings.max_message_size)
        if refusal is None and not self._chunks and self._pnotes is not None and not self._pnotes.data_seen:
            refusal = self._refusal(self._hook("on_data"))
            self._pnotes.data_seen = refusal is None  # passed once: not asked again per chunk
        self._chunk = dotreader.Chunk(size, last=len(parts) == 2, refusal=refusal)
        self._to(BDAT_CHUNK)
        return []

    def _end_of_chunk(self) -> list:
        self._to(COMMAND)
        chunk, self._chunk = self._chunk, None
        assert chunk is not None  # a BDAT chunk was being read
        if chunk.refusal is not None:
            if chunk.refusal.code == 552:
                self._log_refusal("552 5.3.4")
                self._reset()
            return self._error(chunk.refusal)
        self._chunks.append(chunk.data())
        if not chunk.last:
            return [replies.CHUNK_OK.format(size=len(self._chunks[-1]))]
        text = b"".join(self._chunks)
        self._chunks = []
        return self._finish(text)

    def _finish(self, text: bytes) -> list:
        """The whole message text is here: check it, add Received, hand it to the queue."""
        refusal = dotreader.check_text(text)
        if refusal is None:
            hops = dotreader.count_received(text)
            if hops >= self.settings.max_received_headers:
                refusal = replies.LOOP.format(count=hops)
        if refusal is not None:
            self._log_refusal(f"{refusal.code} {refusal.enhanced}")
            self._reset()
            return self._error(refusal)
        envelope, notes = self.envelope, self._pnotes
        assert envelope is not None  # the text ends a transaction that MAIL began
        if self.settings.submission:
            text = self._complete_header(text)
        if notes is not None:
            refusal = self._refusal(self._hook("on_message", message=api.Message(text)))
            if refusal is not None:
                self._log_refusal(f"{refusal.code} {refusal.enhanced}", plugin="yes")
                self._reset()
                return self._error(refusal)
        text = self._message_edits(text)
        if notes is not None and notes.discard:
            self.services.log("discarded", qid=envelope.queue_id, plugin=notes.discard, size=len(text),
                              nrcpt=len(envelope.recipients))
            return self._after_queue(replies.QUEUED.format(queue_id=envelope.queue_id))
        if self.services.guard is not None and not self.client.trusted:
            self.services.guard.message(self.client, len(text))
        message = NewMessage(
            queue_id=envelope.queue_id,
            sender=str(envelope.sender),
            recipients=tuple(envelope.recipients),
            body=env.received_header(
                envelope, helo=self.helo or "", client_ip=self.client.ip, esmtp=self.esmtp,
                hostname=self.settings.hostname, now=self.services.now(),
                tls=self.tls, authenticated=self.user is not None,
            ) + text,
            priority=(notes.priority if notes is not None and notes.priority else envelope.priority),
            hold=self.settings.hold or bool(notes is not None and notes.quarantine),
            envid=envelope.envid,
            ret=envelope.ret,
            body_type=envelope.body_type,
            smtputf8=envelope.smtputf8,
            client_ip=self.client.ip,
            client_helo=self.helo or "",
            listener=self.settings.listener,
            received_at=self.services.now(),
        )
        if notes is not None and notes.quarantine:
            self.services.log("quarantined", qid=envelope.queue_id, reason=notes.quarantine)
        self._to(WAIT_QUEUE)
        return [Enqueue(message)]

    def _complete_header(self, text: bytes) -> bytes:
        """RFC 6409 §8.1 and §8.3: a submission server adds Date and Message-ID when the
        client left them out (RFC 5322 §3.6 requires Date; Message-ID SHOULD be there)."""
        added = b""
        if not dotreader.has_field(text, b"date"):
            added += b"Date: " + email.utils.formatdate(self.services.now(), localtime=True).encode() + b"\r\n"
        if not dotreader.has_field(text, b"message-id"):
            assert self.envelope is not None  # called by _finish, inside a transaction
            unique = f"{self.envelope.queue_id}.{secrets.token_hex(6)}"
            added += f"Message-ID: <{unique}@{self.settings.hostname}>\r\n".encode()
        return added + text

    def _log_refusal(self, reply: str, **fields) -> None:
        qid = self.envelope.queue_id if self.envelope else None
        self.services.log("reject", qid=qid, ip=self.client.ip, conn=self.client.conn, reply=reply, **fields)

