"""elemta.delivery.maildir: the Maildir protocol on a real file system."""

import os

import pytest

from elemta.delivery.maildir import MaildirError, deliver, mailbox_path


def test_message_lands_in_new_complete_with_return_path(tmp_path):
    template = str(tmp_path / "%d" / "%u")
    name = deliver(template, "Alice@Example.ORG", b"Subject: hi\r\n\r\nbody\r\n", "bob@example.net")
    box = tmp_path / "example.org" / "alice"
    assert (box / "new" / name).read_bytes() == b"Return-Path: <bob@example.net>\nSubject: hi\n\nbody\n"
    assert os.listdir(box / "tmp") == []
    assert (box / "cur").is_dir()


def test_two_messages_get_two_files(tmp_path):
    template = str(tmp_path / "%u")
    names = {deliver(template, "a@example.org", b"x\r\n", "") for _ in range(2)}
    assert len(names) == 2 and sorted(os.listdir(tmp_path / "a" / "new")) == sorted(names)


@pytest.mark.parametrize("address", ["../../etc@example.org", "a@../x", ".hidden@example.org", "a/b@example.org"])
def test_an_address_cannot_climb_out_of_the_template(tmp_path, address):
    with pytest.raises(MaildirError) as caught:
        mailbox_path(str(tmp_path / "%d" / "%u"), address)
    assert caught.value.permanent


def test_a_file_system_problem_is_temporary(tmp_path):
    (tmp_path / "blocked").write_text("a file where the mailbox directory should be")
    with pytest.raises(MaildirError) as caught:
        deliver(str(tmp_path / "blocked" / "%u"), "a@example.org", b"x\r\n", "")
    assert not caught.value.permanent
