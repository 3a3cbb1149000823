"""The splash page's wallet (bitmesh/portal/static): its node unit tests, its signatures checked by
the Python reference, the vectors kept current, and the vendored npm files byte-identical to the
versions package-lock.json pins."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from bitcoin.core import CTransaction
from bitcoin.core.script import SIGHASH_ALL
from bitcoin.wallet import CKey

from bitmesh.channel import contract as c
from bitmesh.channel import wire
from bitmesh.errors import RequestError
from tests.js import make_vectors

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "bitmesh" / "portal" / "static"
WALLET = ROOT / "bitmesh" / "portal" / "wallet"
VECTORS = ROOT / "tests" / "js" / "vectors" / "channel.json"
# Python signs with a random nonce (OpenSSL): its signatures, and the signed funding transactions,
# differ on every generation.
_RANDOM = {"python_signature", "python_signed_tx", "funding_txs"}


def _node(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["node", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _strip_random(value):
    if isinstance(value, dict):
        return {k: _strip_random(v) for k, v in value.items() if k not in _RANDOM}
    if isinstance(value, list):
        return [_strip_random(v) for v in value]
    return value


def test_node_unit_tests_pass():
    run = _node("--test", "tests/js/")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = int(re.search(r"^# pass (\d+)$", run.stdout, re.M).group(1))
    assert passed >= 19 and re.search(r"^# fail 0$", run.stdout, re.M)


def test_vectors_are_what_the_python_reference_builds_today():
    committed = json.loads(VECTORS.read_text())
    assert _strip_random(committed) == _strip_random(json.loads(json.dumps(make_vectors.build()))), (
        "tests/js/vectors/channel.json is stale: run .venv/bin/python -m tests.js.make_vectors")


def test_wallet_signatures_verify_with_the_python_reference():
    run = _node("tests/js/sign_vectors.mjs")
    assert run.returncode == 0, run.stderr
    signed = json.loads(run.stdout)
    vec = json.loads(VECTORS.read_text())
    ch = vec["channel"]
    deposit, funding = ch["deposit"], c.Outpoint(ch["funding"]["txid"], ch["funding"]["vout"])
    contract = c.Contract(bytes.fromhex(vec["keys"]["server_pubkey"]), bytes.fromhex(vec["keys"]["client_pubkey"]),
                          ch["expiry"])
    refund_script = bytes.fromhex(ch["terms"]["refund_script"])
    assert len(signed["payments"]) == len(ch["payments"]) >= 6
    for msg in signed["payments"]:
        amount = msg["amount"]
        tx = c.payment_tx(funding, deposit, amount, refund_script)
        assert msg["tx"] == tx.serialize().hex()
        der, hashtype = c.split_signature(bytes.fromhex(msg["signature"]))
        assert hashtype == c.payment_sighash_type(deposit, amount)
        c.check_signature(contract.client_pubkey, c.payment_sighash(contract, funding, deposit, amount, refund_script),
                          der)  # strict DER, low S, valid: what the server checks
    refund = CTransaction.deserialize(bytes.fromhex(signed["refund"]))
    unsigned = CTransaction(refund.vin, refund.vout, refund.nLockTime, refund.nVersion)
    assert unsigned.serialize().hex() == ch["refund"]["unsigned_tx"]
    sig, empty, script = refund.wit.vtxinwit[0].scriptWitness.stack
    assert empty == b"" and script == contract.witness_script
    der, hashtype = c.split_signature(sig)
    assert hashtype == SIGHASH_ALL
    c.check_signature(contract.client_pubkey, c.contract_sighash(unsigned, contract, deposit, SIGHASH_ALL), der)


def test_wallet_proofs_are_what_the_router_checks():
    """The page's proofs (channel.js channelProof: how it reads its session and closes its channel)
    are its client key's signatures of wire.proof_digest, accepted by wire.check_proof for their own
    action only, and by no other key."""
    run = _node("tests/js/sign_vectors.mjs")
    assert run.returncode == 0, run.stderr
    proofs = json.loads(run.stdout)["proofs"]
    pubkey = bytes.fromhex(json.loads(VECTORS.read_text())["keys"]["client_pubkey"])
    assert set(proofs) == set(wire.PROOF_ACTIONS)
    for action, p in proofs.items():
        assert bytes.fromhex(p["digest"]) == wire.proof_digest(action, p["channel_id"])
        wire.check_proof(pubkey, action, p["channel_id"], p["proof"])  # accepted: no exception
        other = next(a for a in wire.PROOF_ACTIONS if a != action)
        for key, act, cid in ((pubkey, other, p["channel_id"]), (pubkey, action, "ff" * 16),
                              (bytes(CKey(bytes(range(1, 33)), compressed=True).pub), action, p["channel_id"])):
            try:
                wire.check_proof(key, act, cid, p["proof"])
            except RequestError as e:
                assert (e.code, e.http_status) == ("proof_invalid", 403)
            else:
                raise AssertionError(f"{action} proof accepted for {act} {cid} {key.hex()}")


def test_vendored_files_are_the_locked_npm_versions(tmp_path: Path):
    """npm ci checks each tarball against the lock's sha512 integrity; vendor.mjs --check then
    compares every vendored file with the installed one and refuses anything extra."""
    lock = json.loads((WALLET / "package-lock.json").read_text())
    pkg = json.loads((WALLET / "package.json").read_text())
    for name, version in pkg["dependencies"].items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name} must be pinned exactly"
        entry = lock["packages"][f"node_modules/{name}"]
        assert entry["version"] == version and entry["integrity"].startswith("sha512-")
        assert not entry.get("dependencies"), f"{name} must have no dependencies"
    install = tmp_path / "install"
    install.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(WALLET / name, install / name)
    npm = subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                         cwd=install, capture_output=True, text=True, timeout=300)
    assert npm.returncode == 0, npm.stderr
    check = _node(str(WALLET / "vendor.mjs"), "--check", str(install / "node_modules"))
    assert check.returncode == 0, check.stdout + check.stderr

    # the check itself catches a changed byte and a stray file (in a copy of the tree)
    copy = tmp_path / "tree"
    shutil.copytree(WALLET, copy / "wallet", ignore=shutil.ignore_patterns("node_modules"))
    shutil.copytree(STATIC / "vendor", copy / "static" / "vendor")
    target = copy / "static" / "vendor" / "noble-secp256k1" / "index.js"
    target.write_bytes(target.read_bytes() + b"\n")
    (copy / "static" / "vendor" / "extra.js").write_text("")
    bad = _node(str(copy / "wallet" / "vendor.mjs"), "--check", str(install / "node_modules"))
    assert bad.returncode == 1
    assert "noble-secp256k1/index.js differs" in bad.stderr and "extra.js is not in the manifest" in bad.stderr


def test_the_page_loads_only_files_of_the_router():
    """No CDN, no build step: every import is a relative path to a file that is there, and the
    page references nothing outside /static/."""
    modules = sorted(STATIC.rglob("*.js"))
    assert modules
    for module in modules:
        text = module.read_text()
        for spec in re.findall(r"""^\s*(?:import|export)\s[^;]*?\sfrom\s+['"]([^'"]+)['"]""", text, re.M):
            assert spec.startswith("./") or spec.startswith("../"), f"{module.name} imports {spec}"
            assert (module.parent / spec).resolve().is_file(), f"{module.name} imports missing {spec}"
        assert "fetch('http" not in text and 'fetch("http' not in text
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)=["']([^"'#]+)["']""", html)
    assert refs and all(r.startswith("/static/") for r in refs), refs
    for ref in refs:
        assert (STATIC / ref.removeprefix("/static/")).is_file(), ref
    served = sum(p.stat().st_size for p in STATIC.rglob("*") if p.is_file() and "LICENSE" not in p.name)
    assert served < 300_000, f"the wallet grew to {served} bytes"
