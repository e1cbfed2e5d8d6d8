"""elemta.local: who exists in the local domains (accepts) and where their mail goes (expand)."""

import pytest

from elemta import config
from elemta.errors import ConfigError
from elemta.local import MAX_DEPTH, LocalRecipients, read_recipients_file

DOMAINS = ("example.org", "example.net")


def table(recipients=(), aliases=None, postmaster="", domains=DOMAINS):
    return LocalRecipients(domains, recipients, aliases, postmaster)


# -- is_local -------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "local"), [
    ("alice@example.org", True),
    ("alice@example.net", True),
    ("Alice@EXAMPLE.Org", True),
    ("alice@example.org.", True),
    ('"odd@name"@example.org', True),
    ("alice@sub.example.org", False),
    ("alice@example.com", False),
    ("alice@org", False),
    ("postmaster", False),
    ("example.org", False),
    ("", False),
])
def test_is_local_compares_the_domain_exactly_ignoring_case_and_trailing_dot(address, local):
    assert table().is_local(address) is local


def test_configured_domains_are_normalised():
    assert LocalRecipients(["Example.ORG.", "example.NET"]).domains == frozenset(DOMAINS)


# -- open and listed tables ---------------------------------------------------------


@pytest.mark.parametrize("address", [
    "alice@example.org", "anyone@example.net", "Bob@EXAMPLE.ORG", "x@example.org.",
])
def test_open_table_accepts_every_local_address_as_itself(address):
    t = table()
    assert t.accepts(address)
    assert t.expand(address) == (address,)


@pytest.mark.parametrize(("address", "accepted", "expanded"), [
    ("alice@example.org", True, ("alice@example.org",)),
    ("bob@example.net", True, ("bob@example.net",)),
    ("mallory@example.org", False, ()),
    ("alice@example.net", False, ()),  # listed in the other domain only
    ("bob@example.com", True, ("bob@example.com",)),  # not ours to judge
    ("nobody@sub.example.org", True, ("nobody@sub.example.org",)),
])
def test_listed_table_refuses_unknown_local_users_only(address, accepted, expanded):
    t = table(["alice@example.org", "bob@example.net"])
    assert t.accepts(address) is accepted
    assert t.expand(address) == expanded


def test_blank_entries_do_not_make_a_table_listed():
    assert table(["", "  "]).accepts("anyone@example.org")


def test_at_domain_in_recipients_accepts_all_of_that_domain_only():
    t = table(["@example.net", "alice@example.org"])
    assert t.accepts("anyone@example.net")
    assert t.accepts("Other@Example.NET.")
    assert t.expand("anyone@example.net") == ("anyone@example.net",)
    assert t.accepts("alice@example.org")
    assert not t.accepts("bob@example.org")


# -- postmaster -------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "postmaster@example.org", "postmaster@example.net", "PostMaster@Example.NET", "POSTMASTER@example.org.",
])
def test_postmaster_of_every_local_domain_exists_even_when_not_listed(address):
    t = table(["alice@example.org"])
    assert t.accepts(address)
    assert t.expand(address) == (address,)


@pytest.mark.parametrize("address", [
    "postmaster@example.org", "postmaster@example.net", "PostMaster@Example.NET",
])
def test_postmaster_goes_to_the_configured_postmaster(address):
    t = table(["alice@example.org"], postmaster="alice@example.org")
    assert t.accepts(address)
    assert t.expand(address) == ("alice@example.org",)


def test_postmaster_set_to_one_domains_postmaster_serves_all_domains():
    t = table(["alice@example.org"], postmaster="postmaster@example.org")
    assert t.expand("postmaster@example.org") == ("postmaster@example.org",)
    assert t.expand("postmaster@example.net") == ("postmaster@example.org",)


def test_postmaster_may_be_an_alias_or_outside_the_local_domains():
    aliases = {"admins@example.org": "alice@example.org, bob@example.org"}
    t = table(["alice@example.org", "bob@example.org"], aliases, postmaster="admins@example.org")
    assert t.expand("postmaster@example.net") == ("alice@example.org", "bob@example.org")
    outside = table(["alice@example.org"], postmaster="noc@provider.example")
    assert outside.expand("postmaster@example.org") == ("noc@provider.example",)


# -- aliases ----------------------------------------------------------------------------


def test_alias_by_full_address_applies_to_that_domain_only():
    t = table(["alice@example.org"], {"sales@example.org": "alice@example.org"})
    assert t.accepts("sales@example.org")
    assert t.expand("sales@example.org") == ("alice@example.org",)
    assert not t.accepts("sales@example.net")
    assert t.expand("sales@example.net") == ()


@pytest.mark.parametrize("address", ["abuse@example.org", "abuse@example.net", "ABUSE@Example.Net."])
def test_alias_by_bare_local_part_applies_to_every_local_domain(address):
    t = table(["alice@example.org"], {"abuse": "alice@example.org"})
    assert t.accepts(address)
    assert t.expand(address) == ("alice@example.org",)


def test_alias_by_full_address_wins_over_bare_local_part():
    t = table(["alice@example.org", "bob@example.net"],
              {"abuse": "alice@example.org", "abuse@example.net": "bob@example.net"})
    assert t.expand("abuse@example.org") == ("alice@example.org",)
    assert t.expand("abuse@example.net") == ("bob@example.net",)


def test_alias_wins_over_a_listed_recipient_of_the_same_name():
    t = table(["alice@example.org", "bob@example.org"], {"bob@example.org": "alice@example.org"})
    assert t.expand("bob@example.org") == ("alice@example.org",)


def test_alias_with_several_targets_keeps_their_order_and_spelling():
    aliases = {"team@example.org": " alice@example.org,Bob@Example.NET , carol@elsewhere.example,"}
    t = table(["alice@example.org", "bob@example.net"], aliases)
    assert t.expand("team@example.org") == ("alice@example.org", "Bob@Example.NET", "carol@elsewhere.example")


def test_alias_targets_that_differ_only_in_case_are_delivered_once():
    t = table(["alice@example.org"], {"team": "alice@example.org, ALICE@example.org, alice@Example.Org."})
    assert t.expand("team@example.org") == ("alice@example.org",)


def test_alias_chain_is_followed_to_the_final_addresses():
    aliases = {
        "info": "sales@example.org",
        "sales@example.org": "team@example.net",
        "team@example.net": "alice@example.org, bob@example.net, partner@elsewhere.example",
    }
    t = table(["alice@example.org", "bob@example.net"], aliases)
    assert t.accepts("info@example.org")
    assert t.expand("info@example.org") == ("alice@example.org", "bob@example.net", "partner@elsewhere.example")


def test_alias_chain_of_max_depth_links_is_followed_to_its_end():
    aliases = {f"a{i}@example.org": f"a{i + 1}@example.org" for i in range(MAX_DEPTH)}
    t = table([f"a{MAX_DEPTH}@example.org"], aliases)
    assert t.expand("a0@example.org") == (f"a{MAX_DEPTH}@example.org",)


def test_alias_chain_longer_than_max_depth_stops():
    aliases = {f"a{i}@example.org": f"a{i + 1}@example.org" for i in range(3 * MAX_DEPTH)}
    t = table([f"a{3 * MAX_DEPTH}@example.org"], aliases)
    assert t.expand("a0@example.org") == (f"a{MAX_DEPTH}@example.org",)


@pytest.mark.parametrize("aliases", [
    {"a@example.org": "a@example.org"},
    {"a@example.org": "b@example.org", "b@example.org": "a@example.org"},
    {"a": "b@example.net", "b": "c@example.org", "c": "a@example.org"},
    {"a": "b@example.org, a@example.net", "b": "a@example.org"},
], ids=["self", "two", "three", "bare-and-full"])
def test_alias_loop_terminates_with_addresses_of_the_loop(aliases):
    members = {"a@example.org", "a@example.net", "b@example.org", "b@example.net", "c@example.org"}
    t = table(["someone@example.org"], aliases)
    assert t.accepts("a@example.org")
    result = t.expand("a@example.org")  # returns at all: no endless recursion
    # Only addresses of the loop come out; a loop with no way out leaves nobody (a bounce).
    assert set(result) <= members


def test_catch_all_alias_takes_unknown_users_of_its_domain():
    t = table(["alice@example.org", "bob@example.org"], {"@example.org": "alice@example.org"})
    assert t.accepts("whoever@example.org")
    assert t.expand("Whoever@Example.ORG") == ("alice@example.org",)
    assert t.expand("bob@example.org") == ("bob@example.org",)  # listed users keep their mail
    assert not t.accepts("whoever@example.net")  # no catch-all there


def test_catch_all_comes_after_specific_aliases():
    aliases = {"@example.org": "alice@example.org", "sales": "bob@example.org"}
    t = table(["alice@example.org", "bob@example.org"], aliases)
    assert t.expand("sales@example.org") == ("bob@example.org",)
    assert t.expand("other@example.org") == ("alice@example.org",)


def test_non_local_address_is_never_expanded():
    t = table(["alice@example.org"], {"bob@elsewhere.example": "alice@example.org"})
    assert t.expand("bob@elsewhere.example") == ("bob@elsewhere.example",)


# -- case and trailing dots --------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "alice@example.org", "ALICE@EXAMPLE.ORG", "Alice@Example.Org.",
])
def test_listed_addresses_match_ignoring_case_and_trailing_dot(address):
    t = table(["Alice@Example.ORG."])
    assert t.accepts(address)


@pytest.mark.parametrize("address", ["sales@example.org", "SALES@Example.ORG", "Sales@example.org."])
def test_alias_keys_match_ignoring_case_and_trailing_dot(address):
    t = table(["alice@example.org"], {"Sales@Example.ORG.": "alice@example.org"})
    assert t.expand(address) == ("alice@example.org",)


# -- recipients file and configuration ----------------------------------------------------


def test_read_recipients_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "recipients"
    path.write_text(
        "# local users\n"
        "alice@example.org\n"
        "\n"
        "   \n"
        "   # indented comment\n"
        "  bob@example.net  \r\n"
        "@example.com\n"
        "carol@example.org",  # no final newline
        encoding="utf-8",
    )
    assert read_recipients_file(str(path)) == [
        "alice@example.org", "bob@example.net", "@example.com", "carol@example.org"]


def test_empty_recipients_file_gives_no_addresses(tmp_path):
    path = tmp_path / "recipients"
    path.write_text("# nobody yet\n\n", encoding="utf-8")
    assert read_recipients_file(str(path)) == []


@pytest.mark.parametrize("name", ["missing", "."], ids=["missing-file", "directory"])
def test_unreadable_recipients_file_is_a_config_error_naming_the_key_and_path(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(ConfigError, match=r"^local\.recipients_file: ") as info:
        read_recipients_file(path)
    assert path in str(info.value)


def test_from_config_combines_recipients_file_aliases_and_postmaster(tmp_path):
    path = tmp_path / "recipients"
    path.write_text("# more users\nbob@example.net\n\n", encoding="utf-8")
    cfg = config.parse({
        "smtp": {"local_domains": ["Example.ORG", "example.net."]},
        "local": {
            "recipients": ["alice@example.org"],
            "recipients_file": str(path),
            "aliases": {"Sales@Example.ORG": "alice@example.org, bob@example.net", "abuse": "alice@example.org"},
            "postmaster": "bob@example.net",
        },
    })
    t = LocalRecipients.from_config(cfg)
    assert t.domains == frozenset(DOMAINS)
    assert t.accepts("alice@example.org")
    assert t.accepts("bob@example.net")  # from the file
    assert not t.accepts("carol@example.org")
    assert t.expand("sales@example.org") == ("alice@example.org", "bob@example.net")
    assert t.expand("abuse@example.net") == ("alice@example.org",)
    assert t.expand("postmaster@example.org") == ("bob@example.net",)
    assert t.accepts("anyone@example.com")


def test_from_config_without_recipients_is_an_open_table():
    t = LocalRecipients.from_config(config.parse({"smtp": {"local_domains": ["example.org"]}}))
    assert t.accepts("anyone@example.org")
    assert t.expand("anyone@example.org") == ("anyone@example.org",)


def test_from_config_with_a_missing_recipients_file_is_a_config_error(tmp_path):
    path = str(tmp_path / "nope")
    cfg = config.parse({"smtp": {"local_domains": ["example.org"]}, "local": {"recipients_file": path}})
    with pytest.raises(ConfigError, match=r"local\.recipients_file: .*nope"):
        LocalRecipients.from_config(cfg)


# -- alias chains -------------------------------------------------------------------------------


def test_alias_reached_by_two_paths_is_expanded_on_both():
    aliases = {
        "list@example.org": "a@example.org, b@example.org",
        "a@example.org": "shared@example.org",
        "b@example.org": "shared@example.org",
        "shared@example.org": "real1@example.org, real2@example.org",
    }
    t = table(["real1@example.org", "real2@example.org"], aliases)
    assert t.expand("list@example.org") == ("real1@example.org", "real2@example.org")


def test_alias_loop_with_an_exit_expands_to_the_exit_only():
    t = table(["c@example.org"], {"a@example.org": "b@example.org", "b@example.org": "c@example.org, a@example.org"})
    assert t.expand("a@example.org") == ("c@example.org",)


def test_key_is_one_mailbox_as_the_table_sees_it():
    """Duplicate final recipients of a message are found by this key (issue 16, defect 9)."""
    local = LocalRecipients(["example.test"], ["alice@example.test"])
    assert local.key("Alice@EXAMPLE.test") == local.key("alice@example.test.") == "alice@example.test"
    # Outside the local domains only the domain is ours to compare without case.
    assert local.key("Bob@Remote.EXAMPLE") == "Bob@remote.example"
    assert local.key("bob@remote.example") != local.key("Bob@remote.example")
