"""The manifests in istio/ are checked offline against Istio's published CRD schemas (no cluster here)."""

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The CRDs of the kinds in istio/ (AuthorizationPolicy, EnvoyFilter), kept in the repo so that every clone checks them.
CRDS = ROOT / "tests" / "fixtures" / "istio-crds" / "authorizationpolicy-envoyfilter.gen.yaml"


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "istio").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for crd in yaml.safe_load_all(CRDS.read_text()):
        if not crd:
            continue
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def test_every_manifest_has_kind_and_name() -> None:
    docs = manifests()
    assert docs, "istio/ holds manifests"
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), name
        if doc["kind"] != "IstioOperator":
            assert doc["metadata"]["name"], name


def test_istio_resources_match_the_crd_schemas() -> None:
    schemas = crd_schemas()
    checked = set()
    for _, doc in manifests():
        if doc["apiVersion"].split("/")[0].endswith(".istio.io") and doc["kind"] != "IstioOperator":
            schema = schemas[(doc["apiVersion"], doc["kind"])]  # a kind or version not kept here is a test failure
            jsonschema.validate({"spec": doc["spec"]}, {**schema, "required": []})
            checked.add(doc["kind"])
    assert checked == {"AuthorizationPolicy", "EnvoyFilter"}


def test_the_crd_schemas_catch_a_bad_field() -> None:
    schemas = crd_schemas()
    policy = next(doc for _, doc in manifests() if doc["kind"] == "AuthorizationPolicy")
    schema = {**schemas[(policy["apiVersion"], "AuthorizationPolicy")], "required": []}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": {**policy["spec"], "action": "MAYBE"}}, schema)


def test_custom_policy_points_at_a_declared_provider() -> None:
    docs = manifests()
    providers = {
        provider["name"]
        for _, doc in docs
        if doc["kind"] == "IstioOperator"
        for provider in doc["spec"]["meshConfig"]["extensionProviders"]
    }
    customs = [doc for _, doc in docs if doc["kind"] == "AuthorizationPolicy" and doc["spec"]["action"] == "CUSTOM"]
    assert customs
    for doc in customs:
        assert doc["spec"]["provider"]["name"] in providers
    for _, doc in docs:
        if doc["kind"] == "IstioOperator":
            for provider in doc["spec"]["meshConfig"]["extensionProviders"]:
                body = provider.get("envoyExtAuthzGrpc") or provider.get("envoyExtAuthzHttp")
                assert body["timeout"], "Istio's default timeout is 600s: always set one"
                assert body["failOpen"] is False


def test_configmap_policy_is_a_valid_extauthz_policy(tmp_path: Path) -> None:
    from meshgate.validate import validate_path

    for _, doc in manifests():
        if doc["kind"] == "ConfigMap" and "policy.yaml" in doc.get("data", {}):
            policy = tmp_path / "policy.yaml"
            policy.write_text(doc["data"]["policy.yaml"])
            assert "extauthz policy" in validate_path(policy)
            return
    pytest.fail("no policy ConfigMap in istio/")


def test_configmap_descriptors_are_a_valid_ratelimit_config(tmp_path: Path) -> None:
    from meshgate.validate import validate_path

    found = 0
    for _, doc in manifests():
        if doc["kind"] != "ConfigMap":
            continue
        for name, text in doc.get("data", {}).items():
            if text.lstrip().startswith("domain:"):
                (tmp_path / name).write_text(text)
                found += 1
    assert found, "istio/ ships a ratelimit descriptor ConfigMap"
    assert "ratelimit config" in validate_path(tmp_path)


def test_ratelimit_service_is_called_with_a_valid_authority() -> None:
    """Istio's cluster names hold '|', not valid in :authority (Envoy's default is the cluster name)."""
    calls = [
        patch["patch"]["value"]["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"]
        for _, doc in manifests()
        if doc["kind"] == "EnvoyFilter"
        for patch in doc["spec"]["configPatches"]
        if patch["applyTo"] == "HTTP_FILTER"
    ]
    assert calls
    for call in calls:
        assert "|" in call["cluster_name"] and call["authority"] and "|" not in call["authority"]


def test_admin_ports_stay_off_the_services() -> None:
    """The admin port serves ratelimit's POST /json (it spends quota): only probes and Prometheus, on the pod."""
    services = [doc for _, doc in manifests() if doc["kind"] == "Service"]
    assert services
    for doc in services:
        assert all("admin" not in port["name"] and port["port"] != 9090 for port in doc["spec"]["ports"])
