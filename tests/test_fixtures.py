"""The committed fixtures still say what their facts files say, by tshark's own reading, and the
recorded impairments are the ones the recorder was told to make."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from capture.tshark_facts import facts, have_tshark

pytestmark = [pytest.mark.tshark, pytest.mark.skipif(not have_tshark(), reason="needs tshark")]

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"
FIXTURES = sorted(p.stem for p in PCAPS.glob("*.pcap"))


def stored(name: str) -> dict:
    return json.loads((PCAPS / f"{name}.facts.json").read_text())


def test_fixture_set_is_complete_and_small():
    assert len(FIXTURES) >= 11
    assert sum((PCAPS / f"{n}.pcap").stat().st_size for n in FIXTURES) < 2_000_000


@pytest.mark.parametrize("name", FIXTURES)
def test_facts_file_matches_tshark_now(name):
    want = stored(name)
    want.pop("fixture")
    assert facts(str(PCAPS / f"{name}.pcap")) == want


@pytest.mark.parametrize("name", FIXTURES)
def test_every_sip_transaction_was_answered(name):
    f = stored(name)
    assert f["sip_messages"] > 0
    assert f["txn"]["unanswered"] == 0
    assert f["txn"]["transactions"] == len(f["transactions_list"])


def test_induced_rtp_loss_is_what_tshark_counts():
    f = stored("rtp_loss_jitter")
    exp = f["fixture"]["rtp"]
    a, b = exp["a"], exp["b"]
    impaired = [s for s in f["rtp_sdp_streams"] if s["src"] == a and s["dst"] == b]
    clean = [s for s in f["rtp_sdp_streams"] if s["src"] == b and s["dst"] == a]
    assert len(impaired) == len(clean) == f["fixture"]["calls"]
    for s in impaired:
        assert (s["pkts"], s["lost"], s["problem"]) == (exp["packets_per_call_a_to_b"], exp["lost_per_call_a_to_b"], True)
        # a 12 ms late packet after a 20 ms gap shows as a 32 ms delta; a drop as 40 ms or more
        assert s["max_delta_ms"] >= 40
        assert s["mean_jitter_ms"] > 1.0
    for s in clean:
        assert (s["pkts"], s["lost"]) == (exp["packets_per_call_b_to_a"], 0)
        assert s["mean_jitter_ms"] < 1.0


def test_retransmitted_invites_are_in_the_capture():
    f = stored("invite_retransmit")
    calls = f["fixture"]["calls"]
    assert f["txn"]["retransmitted_requests"] == calls
    assert f["methods"]["INVITE"] == 2 * calls
    invites = [t for t in f["transactions_list"] if t["method"] == "INVITE"]
    assert all(t["rtt_ms"] > 1000 for t in invites)


@pytest.mark.parametrize("name,codes", [("reject_486", {"486"}), ("reject_503", {"503"}),
                                        ("cancel_487", {"487"}), ("register_401", {"401"})])
def test_failure_codes(name, codes):
    f = stored(name)
    assert codes <= set(f["status_codes"])
    for c in codes:
        assert f["status_codes"][c] == f["fixture"]["calls"]


def test_tcp_fixture_is_tcp():
    assert stored("tcp_call")["sip_transport"] == ["TCP"]
