"""SPIFFE identity from Envoy's source.principal or from x-forwarded-client-cert."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.config import SpiffeSettings
from extauthz.config_loader import load_config
from extauthz.identity.mtls import SpiffeProvider, principal_from_xfcc
from extauthz.model import AuthenticationError, CheckInput, Identity, IdentityKind, Reason
from meshgate.yamlconf import ConfigError

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
# What an Istio sidecar forwards (SANITIZE_SET): one element, the server's own ID in By=, the client's in URI=.
ISTIO_XFCC = f'By=spiffe://cluster.local/ns/shop/sa/orders;Hash=a1b2c3;Subject="";URI={FRONTEND}'


def inp(principal: str = "", xfcc: str | None = None) -> CheckInput:
    headers = {} if xfcc is None else {"x-forwarded-client-cert": xfcc}
    return CheckInput(method="GET", host="h", path="/", headers=headers, source_principal=principal)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (ISTIO_XFCC, FRONTEND),
        (f'URI="{FRONTEND}"', FRONTEND),
        (f"uri={FRONTEND}", FRONTEND),
        # Several URI SANs: the first SPIFFE one.
        (f"URI=https://example.com;URI={FRONTEND};URI=spiffe://x/y", FRONTEND),
        # Quoted values may hold , ; and escaped quotes without splitting.
        (f'Subject="CN=a,O=b;c \\"q\\"";URI={FRONTEND}', FRONTEND),
        # Envoy appends per hop: the immediate client is the last element, not a client-forged first one.
        (f"URI=spiffe://evil.example/ns/x/sa/admin,By=spiffe://a;URI={FRONTEND}", FRONTEND),
        ("By=spiffe://cluster.local/ns/shop/sa/orders;Hash=abc", ""),
        ("URI=https://not-spiffe", ""),
        ("", ""),
        ('URI="unterminated', ""),
        ("garbage", ""),
        ("URI=" + "spiffe://a/" + "b" * 70_000, ""),
    ],
)
def test_principal_from_xfcc(value: str, expected: str) -> None:
    assert principal_from_xfcc(value) == expected


EXTAUTHZ = "spiffe://cluster.local/ns/meshgate/sa/meshgate-extauthz"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Istio, HTTP mode: orders' sidecar names the caller, then extauthz's own sidecar appends orders itself.
        (f"{ISTIO_XFCC},By={EXTAUTHZ};Hash=f0;URI={ORDERS}", FRONTEND),
        # A plaintext caller: orders' sidecar dropped XFCC, only extauthz's sidecar element is left.
        (f"By={EXTAUTHZ};Hash=f0;URI={ORDERS}", ""),
        # Only trailing elements are skipped: a client-sent one with By= extauthz must not be reached.
        (f"By={EXTAUTHZ};URI=spiffe://evil/ns/x/sa/y,By={ORDERS};URI={FRONTEND},By={EXTAUTHZ};URI={ORDERS}", FRONTEND),
        (f'By="{EXTAUTHZ}";URI={ORDERS}', ""),  # quoted By
        # A client's element opening a quote that never closes would swallow what Envoy appended: no identity.
        (f'URI=spiffe://cluster.local/ns/billing/sa/b;By=x;X=",{ISTIO_XFCC},By={EXTAUTHZ};Subject="";URI={ORDERS}', ""),
    ],
)
def test_principal_from_xfcc_skips_trailing_hops_of_listed_proxies(value: str, expected: str) -> None:
    assert principal_from_xfcc(value, frozenset({EXTAUTHZ})) == expected
    if expected:
        assert principal_from_xfcc(value) != expected  # without the setting the last hop is taken


async def test_xfcc_skip_by_setting_reaches_the_provider() -> None:
    provider = SpiffeProvider(SpiffeSettings(xfcc_skip_by=(EXTAUTHZ,)))
    identity = provider.authenticate(inp(xfcc=f"{ISTIO_XFCC},By={EXTAUTHZ};URI={ORDERS}"))
    assert identity is not None and identity.subject == FRONTEND


async def test_source_principal_becomes_identity() -> None:
    provider = SpiffeProvider(SpiffeSettings())
    await provider.start()
    identity = provider.authenticate(inp(FRONTEND))
    assert identity == Identity(kind=IdentityKind.SPIFFE, subject=FRONTEND, principal=FRONTEND, client="shop/frontend")
    await provider.close()


def test_source_principal_wins_over_xfcc() -> None:
    provider = SpiffeProvider(SpiffeSettings())
    other = "spiffe://cluster.local/ns/a/sa/b"
    assert provider.authenticate(inp(other, ISTIO_XFCC)).principal == other  # type: ignore[union-attr]
    assert provider.authenticate(inp("", ISTIO_XFCC)).principal == FRONTEND  # type: ignore[union-attr]


def test_xfcc_can_be_turned_off() -> None:
    provider = SpiffeProvider(SpiffeSettings(from_xfcc=False))
    assert provider.authenticate(inp("", ISTIO_XFCC)) is None


@pytest.mark.parametrize("principal", ["", "user@example.com", "cluster.local/ns/a/sa/b", "SPIFFE://x/y"])
def test_no_spiffe_principal_is_none(principal: str) -> None:
    assert SpiffeProvider(SpiffeSettings()).authenticate(inp(principal)) is None


def test_spiffe_ids_of_other_shapes_have_no_client() -> None:
    identity = SpiffeProvider(SpiffeSettings()).authenticate(inp("spiffe://example.org/workload/web"))
    assert identity is not None
    assert identity.client == ""
    assert SpiffeProvider(SpiffeSettings()).authenticate(inp("spiffe://example.org")) is not None


@pytest.mark.parametrize(
    "principal",
    ["spiffe://", "spiffe://UPPER.case/ns/a/sa/b", "spiffe://td/ns//sa/b", "spiffe://td/a b", "spiffe://td/x/"],
)
def test_malformed_spiffe_ids_are_rejected(principal: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        SpiffeProvider(SpiffeSettings()).authenticate(inp(principal))
    assert caught.value.reason is Reason.INVALID_PRINCIPAL


def test_trust_domains() -> None:
    provider = SpiffeProvider(SpiffeSettings(trust_domains=("cluster.local",)))
    assert provider.authenticate(inp(FRONTEND)) is not None
    with pytest.raises(AuthenticationError) as caught:
        provider.authenticate(inp("spiffe://evil.example/ns/shop/sa/frontend"))
    assert caught.value.reason is Reason.INVALID_PRINCIPAL


@settings(max_examples=400)
@given(
    xfcc=st.one_of(
        st.text(max_size=200),
        st.lists(st.sampled_from(["URI=", "spiffe://", "td", "/ns/", "/sa/", '"', "\\", ",", ";", "=", "x"])).map(
            "".join
        ),
    ),
    principal=st.one_of(st.text(max_size=100), st.text(max_size=50).map(lambda s: "spiffe://" + s)),
)
def test_fuzz(xfcc: str, principal: str) -> None:
    provider = SpiffeProvider(SpiffeSettings(trust_domains=("td",)))
    for request in (inp("", xfcc), inp(principal, xfcc)):
        try:
            result = provider.authenticate(request)
        except AuthenticationError as error:
            result = None
            reason: Reason | None = error.reason
        else:
            reason = None
        assert reason in (None, Reason.INVALID_PRINCIPAL)
        assert result is None or result.kind is IdentityKind.SPIFFE


@pytest.mark.parametrize(
    "value",
    ["spiffe://", "spiffe://Cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b/", "https://x/y", ""],
)
def test_xfcc_skip_by_needs_a_well_formed_spiffe_id(value: str, tmp_path: Path) -> None:
    """An ID Envoy would never write in By= would silently skip nothing: refused at load."""
    policy = tmp_path / "p.yaml"
    policy.write_text(f"identity:\n  spiffe:\n    xfcc_skip_by: [{value!r}]\n")
    with pytest.raises(ConfigError, match="is not a SPIFFE ID"):
        load_config(policy)
