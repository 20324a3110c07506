//! The registry API in-process: status codes, headers, error bodies, routing.

use http::{Method, StatusCode};
use libtest_mimic::Trial;

use crate::support::{InProcess, sha256, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "http::base_endpoint_answers_with_the_api_version_header",
            base_endpoint,
        ),
        trial(
            "http::head_by_tag_then_get_by_digest_returns_the_same_bytes",
            head_then_get,
        ),
        trial(
            "http::blobs_match_their_digests_and_serve_byte_ranges",
            blobs_and_ranges,
        ),
        trial(
            "http::unknown_digests_are_404_with_oci_codes",
            unknown_digests,
        ),
        trial(
            "http::malformed_digests_and_names_are_400_and_malformed_tags_404_never_500",
            malformed_input,
        ),
        trial(
            "http::push_and_delete_endpoints_are_405_unsupported",
            push_endpoints,
        ),
        trial(
            "http::out_of_range_random_tags_are_404_manifest_unknown_with_a_clear_message",
            out_of_range_tags,
        ),
        trial(
            "http::subdomain_host_reaches_its_generator",
            subdomain_routing,
        ),
        trial(
            "http::names_no_generator_serves_are_name_unknown",
            unrouted_names,
        ),
        trial("http::every_random_pull_is_a_new_image", new_image_per_pull),
    ]
}

fn base_endpoint() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    let reply = r.get("/v2/")?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("docker-distribution-api-version"),
        "registry/2.0"
    );
    let missing = r.get("/nothing")?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing.header("docker-distribution-api-version"),
        "registry/2.0"
    );
    missing.error()?;
    Ok(())
}

fn head_then_get() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    let head = r.head("/v2/random/manifests/2x100")?;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    let digest = head.header("docker-content-digest").to_owned();
    let length: usize = head.header("content-length").parse()?;
    assert_eq!(
        head.header("content-type"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    let get = r.get(&format!("/v2/random/manifests/{digest}"))?;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(
        sha256(&get.body),
        digest,
        "GET by digest returns bytes with that digest"
    );
    assert_eq!(
        get.body.len(),
        length,
        "HEAD's Content-Length is the GET body's length"
    );
    assert_eq!(get.header("docker-content-digest"), digest);
    assert_eq!(get.header("content-type"), head.header("content-type"));

    let again = r.head(&format!("/v2/random/manifests/{digest}"))?;
    assert_eq!(again.header("content-length"), length.to_string());
    Ok(())
}

fn blobs_and_ranges() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    let manifest = r.get("/v2/random/manifests/3x1000")?;
    let m = manifest.json()?;
    let mut digests = vec![
        m["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ];
    let layers = m["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(layers.len(), 3);
    for l in &layers {
        digests.push(l["digest"].as_str().unwrap_or_default().to_owned());
    }
    for d in &digests {
        let blob = r.get(&format!("/v2/random/blobs/{d}"))?;
        assert_eq!(blob.status, StatusCode::OK, "{d}");
        assert_eq!(&sha256(&blob.body), d);
        assert_eq!(blob.header("content-length"), blob.body.len().to_string());
        let head = r.head(&format!("/v2/random/blobs/{d}"))?;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.header("content-length"), blob.body.len().to_string());
        assert_eq!(head.header("docker-content-digest"), d);
    }
    let layer = &digests[1];
    let whole = r.get(&format!("/v2/random/blobs/{layer}"))?.body;
    let part = r.request(
        Method::GET,
        &format!("/v2/random/blobs/{layer}"),
        &[("range", "bytes=10-19")],
    )?;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, whole.slice(10..20));
    assert_eq!(
        part.header("content-range"),
        format!("bytes 10-19/{}", whole.len())
    );
    assert_eq!(part.header("content-length"), "10");
    let beyond = format!("bytes={}-", whole.len());
    let bad = r.request(
        Method::GET,
        &format!("/v2/random/blobs/{layer}"),
        &[("range", &beyond)],
    )?;
    assert_eq!(bad.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        bad.header("content-range"),
        format!("bytes */{}", whole.len())
    );
    Ok(())
}

fn unknown_digests() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    let zero = format!("sha256:{}", "0".repeat(64));
    r.refused(
        &format!("/v2/random/manifests/{zero}"),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )?;
    r.refused(
        &format!("/v2/random/blobs/{zero}"),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    )?;
    let h = r.head(&format!("/v2/random/blobs/{zero}"))?;
    assert_eq!(h.status, StatusCode::NOT_FOUND);
    assert!(h.body.is_empty());
    Ok(())
}

fn malformed_input() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    for (path, code) in [
        ("/v2/random/manifests/sha256:totallywrong", "DIGEST_INVALID"),
        ("/v2/random/blobs/sha256:totallywrong", "DIGEST_INVALID"),
        ("/v2/random/blobs/md5:abc", "DIGEST_INVALID"),
        ("/v2/Random/manifests/latest", "NAME_INVALID"),
        ("/v2/ran..dom/manifests/latest", "NAME_INVALID"),
        ("/v2/random/x%2F..%2Fy/manifests/latest", "NAME_INVALID"),
        (
            &format!("/v2/{}/manifests/latest", "a".repeat(256)),
            "NAME_INVALID",
        ),
        ("/v2/random/tags/list?n=many", "UNSUPPORTED"),
        ("/v2/random/referrers/sha256:totallywrong", "DIGEST_INVALID"),
    ] {
        let message = r.refused(path, StatusCode::BAD_REQUEST, code)?;
        assert!(!message.is_empty(), "{path}");
    }
    // A tag that cannot exist names no manifest: the spec's 404, with the
    // words docker prints.
    for path in [
        "/v2/random/manifests/-latest",
        "/v2/random/manifests/.INVALID_MANIFEST_NAME",
        &format!("/v2/random/manifests/{}", "a".repeat(129)),
    ] {
        let message = r.refused(path, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")?;
        assert!(message.contains("is not valid"), "{path}: {message}");
    }
    Ok(())
}

fn push_endpoints() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    let zero = format!("sha256:{}", "0".repeat(64));
    for (method, path) in [
        (Method::POST, "/v2/x/blobs/uploads/".to_owned()),
        (Method::PATCH, "/v2/x/blobs/uploads/123".to_owned()),
        (Method::PUT, "/v2/x/blobs/uploads/123?digest=x".to_owned()),
        (Method::PUT, "/v2/random/manifests/latest".to_owned()),
        (Method::DELETE, "/v2/random/manifests/latest".to_owned()),
        (Method::DELETE, format!("/v2/random/blobs/{zero}")),
        (Method::POST, "/v2/".to_owned()),
        (Method::DELETE, "/v2/random/tags/list".to_owned()),
    ] {
        let reply = r.request(method, &path, &[])?;
        reply.expect_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")?;
        let allow = reply.header("allow");
        match path.contains("/uploads") {
            // Nothing is allowed on the push side; RFC 9110 says so with an
            // empty Allow.
            true => assert_eq!(allow, "", "{path}"),
            false => assert_eq!(allow, "GET, HEAD", "{path}"),
        }
    }
    Ok(())
}

fn out_of_range_tags() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    for (tag, words) in [
        ("100x1", "1 to 99 layers"),
        ("1x100000000", "1 to 99999999 bytes"),
        ("0x5", "1 to 99 layers"),
    ] {
        let message = r.refused(
            &format!("/v2/random/manifests/{tag}"),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        )?;
        assert!(message.contains(words), "{tag}: {message}");
    }
    Ok(())
}

fn subdomain_routing() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    for host in [
        "random.kontain.test",
        "random.kontain.test:8080",
        "RANDOM.KONTAIN.TEST",
    ] {
        let reply = r.request(
            Method::HEAD,
            "/v2/anything/at/all/manifests/1x10",
            &[("host", host)],
        )?;
        assert_eq!(reply.status, StatusCode::OK, "{host}");
    }
    let other = r.request(
        Method::HEAD,
        "/v2/anything/manifests/1x10",
        &[("host", "other.kontain.test")],
    )?;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    Ok(())
}

fn unrouted_names() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    r.refused(
        "/v2/nosuchgenerator/manifests/latest",
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
    )?;
    Ok(())
}

fn new_image_per_pull() -> anyhow::Result<()> {
    let r = InProcess::random()?;
    let a = r.head("/v2/random/manifests/1x10")?;
    let b = r.head("/v2/random/manifests/1x10")?;
    assert_ne!(
        a.header("docker-content-digest"),
        b.header("docker-content-digest")
    );
    Ok(())
}
