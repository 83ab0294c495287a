"""The handshake benchmark's machinery (benchmarks/handshakes.py): every
route reaches nginx with the client certificate (the worker checks the DN
nginx saw on every answer), the token routes sign in the token, and the
report computes met / not met from the rows.  No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import handshakes

from .test_curl import require_pycurl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run, in a process of its own (its SoftHSM2 configuration and
    the provider are set up once per process)."""
    require_pycurl()
    out = tmp_path_factory.mktemp("handshakes") / "results.json"
    code = (
        "import json, sys\n"
        "from benchmarks import handshakes as h\n"
        "r = h.measure(h.Settings(rounds=1, batch=1, cli_batch=1, fillers=2), log=lambda s: None)\n"
        "open(sys.argv[1], 'w').write(json.dumps(r))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(out.read_text()))


def test_every_route_handshakes_with_the_client_certificate(results: dict) -> None:
    for kt in handshakes.KEY_TYPES:
        for client, mode, _ in handshakes.ROWS:
            rates = results["rates"][kt][handshakes.row_id(client, mode)]
            assert len(rates) == 1 and rates[0] > 0, (kt, client, mode)


def test_the_token_routes_sign_in_the_token(results: dict) -> None:
    for kt, rows in results["calls"].items():
        assert rows, kt
        for rid, calls in rows.items():
            signs = calls.get("C_Sign", 0) + calls.get("C_SignFinal", 0)
            assert signs == 1, (kt, rid, calls)
            assert "C_Login" not in calls and "C_OpenSession" not in calls, (kt, rid, calls)
    assert not any(rid.endswith("/pem") for rows in results["calls"].values() for rid in rows)


def test_setup_pycurl_searches_the_token_for_the_key_only(results: dict) -> None:
    """The certificate goes to libcurl in memory: one search per handshake
    (the key's), where naming it by URI made the engine search twice."""
    for rows in results["calls"].values():
        for mode in ("token", "ephemeral", "token_populated"):
            assert rows[f"pycurl/{mode}"]["C_FindObjectsInit"] == 1, (mode, rows)
        assert rows["pycurl-engcert/token"]["C_FindObjectsInit"] == 2, rows


def _synthetic(token: float, pem: float) -> dict:
    rows = [(c, m) for c, m, _ in handshakes.ROWS]
    rates = {handshakes.row_id(c, m): [pem if m == "pem" else token] * 3 for c, m in rows}
    stats = {rid: {"min": x[0], "q1": x[0], "median": x[0], "q3": x[0], "max": x[0]}
             for rid, x in rates.items()}  # fmt: skip
    return {"rates": {"ec": rates}, "rows": {"ec": stats}, "calls": {}}


def test_the_report_computes_met_and_not_met_from_the_rows() -> None:
    def statuses(results: dict) -> set:
        return {r.get("status") for r in handshakes.ratios(results)} - {None}

    assert statuses(_synthetic(token=80.0, pem=100.0)) == {"met"}
    assert statuses(_synthetic(token=79.0, pem=100.0)) == {"not met"}
    broken = _synthetic(token=90.0, pem=100.0)
    broken["rows"]["ec"]["python/pem"]["median"] = 0.0  # impossible: rejected, never met
    by_row = {r["row"]: r for r in handshakes.ratios(broken)}
    assert by_row["python/token"]["status"] == "rejected"
    assert by_row["pycurl/token"]["status"] == "met"
