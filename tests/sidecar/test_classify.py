"""Routes and slices, compiled once per policy object."""

from __future__ import annotations

from backdial.policy import policy_from_data
from backdial.sidecar.classify import classifier_for, parse_ip

POLICY = {
    "slices": [
        {
            "name": "mobile",
            "match": [
                {"userAgent": "(?i)android|iphone", "cidrs": ["10.8.0.0/16"]},
                {"headers": {"X-Client": "^app-"}},
            ],
            "share": 25,
        },
        {"name": "api", "match": {"pathPrefixes": ["/api/", "/v2/"]}, "share": 25},
        {"name": "gold", "match": {"headers": {"x-tier": "gold", "x-region": "eu"}}, "share": 10},
        {"name": "default", "share": 40},
    ],
    "routes": [
        {"name": "shop-api", "service": "shop-api", "host": "Shop.Example", "pathPrefix": "/api"},
        {"name": "shop", "service": "shop", "host": "shop.example:8443"},
        {"name": "static", "service": "static", "pathPrefix": "/static/"},
        {"name": "img", "service": "img", "pathPrefix": "/static/img/"},
    ],
    "defaultService": "web",
}


def test_routes_host_then_longest_prefix_then_default() -> None:
    c = classifier_for(policy_from_data(POLICY))
    assert c.service(b"shop.example", b"/api/cart") == "shop-api"
    assert c.service(b"shop.example", b"/cart") == "shop"  # port in config ignored
    assert c.service(b"shop.example", b"/static/img/a.png") == "shop"  # host routes win
    assert c.service(b"other", b"/static/img/a.png") == "img"  # longest prefix
    assert c.service(b"other", b"/static/a.css") == "static"
    assert c.service(b"other", b"/") == "web"
    assert classifier_for(policy_from_data({})).service(b"x", b"/") == ""


def test_slices_first_match_all_fields_any_rule() -> None:
    c = classifier_for(policy_from_data(POLICY))
    ip_in, ip_out = parse_ip("10.8.3.4"), parse_ip("192.0.2.1")
    ua = {b"user-agent": b"Mozilla (iPhone)"}
    assert c.slice(ip_in, ua, b"/") == "mobile"
    assert c.slice(ip_out, ua, b"/") == "default"  # CIDR and UA must both match
    assert c.slice(ip_out, {b"x-client": b"app-ios"}, b"/") == "mobile"  # second rule
    assert c.slice(ip_in, ua, b"/api/x") == "mobile"  # order decides
    assert c.slice(ip_out, {}, b"/api/x") == "api"
    assert c.slice(ip_out, {}, b"/apix") == "default"
    assert c.slice(ip_out, {b"x-tier": b"gold", b"x-region": b"eu-west"}, b"/") == "gold"
    assert c.slice(ip_out, {b"x-tier": b"gold"}, b"/") == "default"  # missing header
    assert c.slice(None, ua, b"/") == "default"
    assert c.wanted == {b"user-agent", b"x-client", b"x-tier", b"x-region"}
    assert c.uses_ip and not c.trivial_slices


def test_compiled_once_per_policy_object() -> None:
    p1 = policy_from_data(POLICY)
    c1 = classifier_for(p1)
    assert classifier_for(p1) is c1
    p2 = policy_from_data(POLICY)
    c2 = classifier_for(p2)
    assert c2 is not c1 and c2.policy is p2


def test_default_policy_is_trivial() -> None:
    c = classifier_for(policy_from_data({}))
    assert c.trivial_slices and not c.uses_ip and c.wanted == frozenset()
    assert c.slice(None, {}, b"/") == "default"


def test_parse_ip_unmaps_ipv4_in_ipv6() -> None:
    assert str(parse_ip("::ffff:10.8.0.1")) == "10.8.0.1"
    assert str(parse_ip("fe80::1%eth0")) == "fe80::1"
    assert parse_ip("") is None


def test_real_client_behind_trusted_proxies() -> None:
    from backdial.sidecar.classify import parse_ip
    from backdial.sidecar.realip import TrustedProxies

    trusted = TrustedProxies(["10.0.0.0/8", "192.0.2.1"])
    hop = parse_ip("10.9.9.9")
    assert trusted.trusts(hop) and not trusted.trusts(parse_ip("203.0.113.5"))
    assert not TrustedProxies().trusts(hop)
    # Right to left, skipping trusted proxies; several fields read as one list.
    chain = [b"198.51.100.7, 203.0.113.5", b"192.0.2.1"]
    assert trusted.real_client(chain, hop) == parse_ip("203.0.113.5")
    # Everything trusted: the leftmost; garbage stops the walk at the last good address.
    assert trusted.real_client([b"10.1.1.1, 10.2.2.2"], hop) == parse_ip("10.1.1.1")
    assert trusted.real_client([b"evil, 10.2.2.2"], hop) == parse_ip("10.2.2.2")
    assert trusted.real_client([b"::ffff:203.0.113.5"], hop) == parse_ip("203.0.113.5")
