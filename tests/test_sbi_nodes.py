"""N5g-eir with several EIR nodes: what stands for the DRA in 5G is the NRF (and an SCP, when
the AMF uses indirect communication). Each node registers itself as a 5G_EIR NF instance; the
AMF discovers the instances and chooses one. Two `eir serve --sbi` nodes with their own
Diameter identities register with one stand-in NRF (tests/test_sbi.py's, served by hypercorn):
two distinct, stable instances, each advertising its own endpoint and the priority, capacity
and locality the AMFs choose by (sbi.nrf), both answering the same verdicts; a node that stops deregisters its own instance only, and the other keeps its
heartbeats. docs/SCALE-OUT.md describes the rest (selection, failover), which is the NRF's and
the AMF's and cannot run here."""

from __future__ import annotations

import json
import uuid

import httpx
from helpers_ops import wait_until
from test_sbi import STATUS_PATH, NrfStandIn, imei, start_sbi

NODES = ("eir-a.localdomain", "eir-b.localdomain")
# What each node advertises for the AMFs' choice (sbi.nrf.priority, capacity, locality): one
# node per site, the first preferred.
SELECTION = {"eir-a.localdomain": {"priority": 1, "capacity": 100, "locality": "site-a"},
             "eir-b.localdomain": {"priority": 2, "capacity": 50, "locality": "site-b"}}
BLACKLISTED = "35209900176148"  # config/lists/example.csv: reported stolen


def test_two_nodes_register_as_two_5g_eir_instances_and_answer_alike(eir_server, tmp_path):
    with NrfStandIn(heartbeat_seconds=1) as nrf:
        nodes = []
        for identity in NODES:
            config = tmp_path / f"{identity}.yaml"
            config.write_text(f"sbi:\n  nrf:\n    url: {nrf.url}\n    heartbeat_seconds: 1\n"
                              + "".join(f"    {key}: {value}\n"
                                        for key, value in SELECTION[identity].items()))
            nodes.append(start_sbi(eir_server, "--config", str(config), "--origin-host",
                                   identity)[0])
        # Each node's instance id follows from its Diameter identity: two instances, and
        # the same ones again after a restart.
        paths = {f"/nnrf-nfm/v1/nf-instances/{uuid.uuid5(uuid.NAMESPACE_DNS, identity)}"
                 for identity in NODES}

        def seen(method: str) -> set[str]:
            return {path for verb, path, _, _ in list(nrf.requests) if verb == method}

        wait_until(lambda: seen("PUT") == paths and seen("PATCH") == paths,
                   "both nodes registered and heartbeating", timeout=15)
        profiles = [json.loads(body) for verb, _, _, body in list(nrf.requests)
                    if verb == "PUT"]
        assert {profile["nfType"] for profile in profiles} == {"5G_EIR"}
        for identity in NODES:
            instance = str(uuid.uuid5(uuid.NAMESPACE_DNS, identity))
            profile, = (p for p in profiles if p["nfInstanceId"] == instance)
            assert profile == profile | SELECTION[identity], profile
        # What an AMF does with the discovered profiles: any instance, the same verdict.
        endpoints = {(point["ipv4Address"], point["port"]) for profile in profiles
                     for point in profile["nfServices"][0]["ipEndPoints"]}
        assert endpoints == {("127.0.0.1", int(node.wait_for_log(
            r"N5g-eir served on http://127\.0\.0\.1:(\d+)/").group(1))) for node in nodes}
        with httpx.Client(http1=False, http2=True, timeout=10) as client:
            for host, port in endpoints:
                response = client.get(f"http://{host}:{port}{STATUS_PATH}",
                                      params={"pei": imei(BLACKLISTED)})
                assert (response.status_code, response.json()["status"]) == (200,
                                                                             "BLACKLISTED")

        stopped, kept = nodes[0], nodes[1]
        assert stopped.stop() == 0
        stopped_path = f"/nnrf-nfm/v1/nf-instances/{uuid.uuid5(uuid.NAMESPACE_DNS, NODES[0])}"
        assert seen("DELETE") == {stopped_path}
        after = len(nrf.requests)
        kept_path, = paths - {stopped_path}
        wait_until(lambda: any(verb == "PATCH" and path == kept_path
                               for verb, path, _, _ in list(nrf.requests)[after:]),
                   "the other node heartbeating on", timeout=5)
        assert kept.process.poll() is None
