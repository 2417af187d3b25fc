"""SPIFFE identity in HTTP mode behind two Istio-like sidecars, through real Envoys.

The protected workload's sidecar (Envoy A: mTLS listener, APPEND_FORWARD, ext_authz over HTTP) asks extauthz through
extauthz's own sidecar (Envoy B, ``envoy/istio-sidecar-inbound.yaml``), which appends one more XFCC element: B's ID
in ``By=``, A's in ``URI=``. ``identity.spiffe.xfcc_skip_by`` passes over that element, so the caller that A saw
is the identity; without it the caller looks like the workload itself.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from meshgate.devservers.echo import EchoThread
from meshgate.devservers.service import ServiceProcess
from meshgate.envoy import EnvoyProcess, render
from tests.support.http import get
from tests.support.pki import CertFiles, TestCA

CALLER = "spiffe://cluster.local/ns/billing/sa/ledger"
WORKLOAD = "spiffe://cluster.local/ns/shop/sa/orders"
MESHGATE = "spiffe://cluster.local/ns/meshgate/sa/meshgate-extauthz"

POLICY = """\
version: 1
identity:
  order: [spiffe]
  spiffe: {{trust_domains: [cluster.local]{skip}}}
rules:
  - name: billing-may-call
    match: {{path_prefixes: [/]}}
    identity: {{principals: ["spiffe://cluster.local/ns/billing/sa/*"]}}
"""


def _with_client_cert(config: str, cluster: str, cert: CertFiles, ca: Path) -> str:
    """Envoy A's cluster to extauthz's sidecar speaks mTLS with the workload's certificate, as Istio's does."""
    anchor = f"  - name: {cluster}\n    type: STATIC\n    connect_timeout: 1s\n"
    assert anchor in config
    tls = (
        "    transport_socket:\n"
        "      name: envoy.transport_sockets.tls\n"
        "      typed_config:\n"
        '        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n'
        "        common_tls_context:\n"
        "          tls_certificates:\n"
        f'          - certificate_chain: {{filename: "{cert.cert}"}}\n'
        f'            private_key: {{filename: "{cert.key}"}}\n'
        "          validation_context:\n"
        f'            trusted_ca: {{filename: "{ca}"}}\n'
    )
    return config.replace(anchor, anchor + tls, 1)


@pytest.fixture
def pki(tmp_path: Path) -> tuple[TestCA, CertFiles, CertFiles, CertFiles]:
    ca = TestCA(tmp_path)
    return ca, ca.spiffe_client(CALLER), ca.workload(WORKLOAD, "orders"), ca.workload(MESHGATE, "meshgate")


@pytest.mark.parametrize(("skip", "expected"), [(True, 200), (False, 403)], ids=["skip-own-sidecar", "no-skip"])
def test_caller_identity_survives_extauthz_own_sidecar(
    tmp_path: Path, pki: tuple[TestCA, CertFiles, CertFiles, CertFiles], skip: bool, expected: int
) -> None:
    ca, caller, orders, meshgate = pki
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(skip=f", xfcc_skip_by: [{MESHGATE}]" if skip else ""))
    with (
        ServiceProcess(["extauthz", "--config", str(policy)]) as service,
        EchoThread() as upstream,
        EnvoyProcess().start(
            render(
                "istio-sidecar-inbound",
                listen_port=0,
                app_port=service.ports["http_port"],
                server_cert=meshgate.cert,
                server_key=meshgate.key,
                client_ca=ca.ca_file,
            )
        ) as extauthz_sidecar,
    ):
        workload_sidecar_config = _with_client_cert(
            render(
                "extauthz-http-mtls",
                listen_port=0,
                upstream_port=upstream.port,
                authz_port=extauthz_sidecar.listener_port(),
                server_cert=orders.cert,
                server_key=orders.key,
                client_ca=ca.ca_file,
            ).replace("forward_client_cert_details: SANITIZE_SET", "forward_client_cert_details: APPEND_FORWARD"),
            "extauthz",
            orders,
            ca.ca_file,
        )
        with EnvoyProcess().start(workload_sidecar_config) as workload_sidecar:
            tls = ssl.create_default_context(cafile=str(ca.ca_file))
            tls.load_cert_chain(str(caller.cert), str(caller.key))
            status, _, raw = get(workload_sidecar.listener_port(), "/invoices", {}, tls)
    assert status == expected, raw
    body = json.loads(raw)
    if skip:
        assert body["headers"]["x-auth-subject"] == CALLER
    else:  # the last hop named the workload's sidecar: a caller it is not
        assert body["error"]["code"] == "forbidden"
