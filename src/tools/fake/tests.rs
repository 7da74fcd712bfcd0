//! The fake as its clients see it: real HTTP against a server on 127.0.0.1:0.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::{json, Value};

use super::{FakeOptions, FakeServer, Faults};

const MS: Duration = Duration::from_millis(1);

/// reqwest is built without a default TLS provider; even a plain-http client needs one.
fn client() -> reqwest::Client {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON answer")
    };
    Answer {
        status,
        headers,
        body,
    }
}

async fn start(faults: Faults) -> FakeServer {
    let options = FakeOptions {
        faults,
        ..FakeOptions::default()
    };
    FakeServer::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("the fake starts")
}

async fn request_token(fake: &FakeServer, form: &[(&str, &str)]) -> Answer {
    let response = client()
        .post(fake.auth_url())
        .form(form)
        .send()
        .await
        .expect("token request");
    answer(response).await
}

async fn token(fake: &FakeServer) -> String {
    let issued = request_token(
        fake,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "fake-client-id"),
            ("client_secret", "fake-client-secret"),
        ],
    )
    .await;
    assert_eq!(issued.status, 200, "{}", issued.body);
    issued.body["access_token"].as_str().unwrap().to_owned()
}

fn url(fake: &FakeServer, list: &str) -> String {
    format!("{}/List/{list}/Contact/SegmentationField", fake.api_url())
}

async fn send(fake: &FakeServer, token: &str, list: &str, body: &Value) -> Answer {
    send_raw(
        fake,
        Some(token),
        list,
        "application/json",
        body.to_string(),
    )
    .await
}

async fn send_raw(
    fake: &FakeServer,
    token: Option<&str>,
    list: &str,
    content_type: &str,
    body: String,
) -> Answer {
    let mut request = client()
        .post(url(fake, list))
        .header(CONTENT_TYPE, content_type)
        .body(body);
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    answer(request.send().await.expect("SegmentationField request")).await
}

fn contact(email: &str, fields: &[(u32, &str)]) -> Value {
    json!({
        "emailAddress": email,
        "segmentationFieldValues": fields
            .iter()
            .map(|(id, value)| json!({"segmentationFieldId": id, "value": value}))
            .collect::<Vec<_>>(),
    })
}

fn one(email: &str, field: u32, value: &str) -> Value {
    json!([contact(email, &[(field, value)])])
}

async fn control(
    fake: &FakeServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut request = client().request(method, format!("http://{}{path}", fake.addr()));
    if let Some(body) = body {
        request = request
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    answer(request.send().await.expect("control request")).await
}

#[tokio::test]
async fn right_credentials_get_a_bearer_token_for_the_token_lifetime() {
    let fake = start(Faults::default()).await;
    let issued = request_token(
        &fake,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "fake-client-id"),
            ("client_secret", "fake-client-secret"),
        ],
    )
    .await;
    assert_eq!(issued.status, 200);
    assert_eq!(issued.body["token_type"], "Bearer");
    assert_eq!(issued.body["expires_in"], 900);
    assert!(issued.body["access_token"].as_str().unwrap().len() >= 32);
    assert_eq!(fake.tokens_issued(), 1);
}

#[tokio::test]
async fn wrong_credentials_get_401_invalid_credentials() {
    let fake = start(Faults::default()).await;
    let refused = request_token(
        &fake,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "fake-client-id"),
            ("client_secret", "guess"),
        ],
    )
    .await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["status"], 401);
    assert_eq!(refused.body["error"], "ERROR_INVALID_CREDENTIALS");
    assert_eq!(fake.tokens_issued(), 0);
}

#[tokio::test]
async fn token_requests_without_the_client_credentials_grant_or_a_form_get_400() {
    let fake = start(Faults::default()).await;
    let credentials = [
        ("client_id", "fake-client-id"),
        ("client_secret", "fake-client-secret"),
    ];
    let no_grant = request_token(&fake, &credentials).await;
    assert_eq!(no_grant.status, 400);
    assert!(no_grant.body["message"]
        .as_str()
        .unwrap()
        .contains("grant_type"));
    let password_grant = request_token(
        &fake,
        &[&[("grant_type", "password")][..], &credentials].concat(),
    )
    .await;
    assert_eq!(password_grant.status, 400);
    assert_eq!(password_grant.body["error"], "ERROR_INVALID_PARAMETER");
    let as_json = client()
        .post(fake.auth_url())
        .header(CONTENT_TYPE, "application/json")
        .body(r#"{"grant_type":"client_credentials"}"#)
        .send()
        .await
        .unwrap();
    let as_json = answer(as_json).await;
    assert_eq!(as_json.status, 400);
    assert_eq!(as_json.body["error"], "ERROR_UNSUPPORTED_CONTENT_TYPE");
    assert_eq!(fake.tokens_issued(), 0);
}

#[tokio::test]
async fn requests_without_a_known_token_get_401_and_are_recorded() {
    let fake = start(Faults::default()).await;
    let body = one("a@example.com", 456, "on").to_string();
    let missing = send_raw(&fake, None, "12", "application/json", body.clone()).await;
    let forged = send_raw(&fake, Some("forged"), "12", "application/json", body).await;
    for refused in [missing, forged] {
        assert_eq!(refused.status, 401);
        assert_eq!(
            refused.body,
            json!({
                "status":401,
                "error":"ERROR_UNAUTHORIZED",
                "message":"Authorization was denied for this request."
            })
        );
    }
    let recorded = fake.requests();
    assert_eq!(recorded.len(), 2);
    assert!(recorded
        .iter()
        .all(|request| request.status == 401 && request.token_generation.is_none()));
    assert_eq!(recorded[0].emails, ["a@example.com"]);
    assert!(fake.contacts().is_empty());
}

#[tokio::test]
async fn an_expired_token_gets_401_and_a_fresh_one_is_accepted() {
    let fake = start(Faults {
        token_lifetime: 300 * MS,
        ..Faults::default()
    })
    .await;
    let old = token(&fake).await;
    assert_eq!(
        send(&fake, &old, "12", &one("a@example.com", 1, "on"))
            .await
            .status,
        201
    );
    tokio::time::sleep(350 * MS).await;
    assert_eq!(
        send(&fake, &old, "12", &one("a@example.com", 1, "on"))
            .await
            .status,
        401
    );
    let fresh = token(&fake).await;
    assert_eq!(
        send(&fake, &fresh, "12", &one("a@example.com", 1, "on"))
            .await
            .status,
        201
    );
    let generations: Vec<_> = fake
        .requests()
        .iter()
        .map(|request| request.token_generation)
        .collect();
    assert_eq!(generations, [Some(1), Some(1), Some(2)]);
}

#[tokio::test]
async fn a_body_that_is_not_declared_json_gets_415() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    let body = one("a@example.com", 1, "on").to_string();
    let refused = send_raw(&fake, Some(&token), "12", "text/plain", body.clone()).await;
    assert_eq!(refused.status, 415);
    assert_eq!(refused.body["error"], "ERROR_UNSUPPORTED_CONTENT_TYPE");
    let with_charset = send_raw(
        &fake,
        Some(&token),
        "12",
        "application/json; charset=utf-8",
        body,
    )
    .await;
    assert_eq!(with_charset.status, 201);
}

#[tokio::test]
async fn bodies_that_break_the_spec_get_400_naming_what_is_wrong() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    let cases = [
        (
            one("a@example.com", 1, "on")[0].clone(),
            "expected an array",
        ),
        (json!([]), "at least one contact"),
        (
            json!([{"segmentationFieldValues": [{"segmentationFieldId": 1, "value": "on"}]}]),
            "emailAddress",
        ),
        (
            json!([
                {
                    "emailAddress": "a@example.com",
                    "segmentationFieldValues": [{"segmentationFieldId": 1, "value": 1}]
                }
            ]),
            "value",
        ),
        (
            json!([
                {
                    "emailAddress": "a@example.com",
                    "segmentationFieldValues": [{"segmentationFieldId": 0, "value": "on"}]
                }
            ]),
            "segmentationFieldId",
        ),
        (
            json!([
                {
                    "emailAddress": "a@example.com",
                    "segmentationFieldValues": [{"segmentationFieldId": -3, "value": "on"}]
                }
            ]),
            "segmentationFieldId",
        ),
        (
            json!([
                {
                    "emailAddress": "nobody",
                    "segmentationFieldValues": [{"segmentationFieldId": 1, "value": "on"}]
                }
            ]),
            "emailAddress",
        ),
    ];
    for (body, named) in cases {
        let refused = send(&fake, &token, "12", &body).await;
        assert_eq!(refused.status, 400, "{body}");
        assert_eq!(refused.body["status"], 400, "{body}");
        assert_eq!(refused.body["error"], "ERROR_INVALID_PARAMETER", "{body}");
        let message = refused.body["message"].as_str().unwrap();
        assert!(message.contains(named), "{body}: {message}");
    }
    let not_json = send_raw(&fake, Some(&token), "12", "application/json", "[{".into()).await;
    assert_eq!(not_json.status, 400);
    assert_eq!(not_json.body["error"], "ERROR_MALFORMED_REQUEST_BODY");
    assert!(fake.contacts().is_empty());
}

#[tokio::test]
async fn a_list_id_that_is_not_a_positive_int32_gets_400() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    for list in ["0", "-5", "abc", "2147483648"] {
        let refused = send(&fake, &token, list, &one("a@example.com", 1, "on")).await;
        assert_eq!(refused.status, 400, "{list}");
        assert!(
            refused.body["message"].as_str().unwrap().contains("listId"),
            "{list}"
        );
    }
    assert!(fake
        .requests()
        .iter()
        .all(|request| request.list_id.is_none()));
}

#[tokio::test]
async fn an_accepted_request_gets_201_and_later_requests_overwrite_earlier_ones() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    let body = json!([
        contact("a@example.com", &[(456, "on"), (789, "gold")]),
        contact("b@example.com", &[(456, "off")]),
    ]);
    let created = send(&fake, &token, "12345", &body).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.body["status"], 201);
    assert_eq!(created.body["resourceId"].as_str().unwrap().len(), 36);
    assert_eq!(
        fake.value(12345, "a@example.com", 456).as_deref(),
        Some("on")
    );

    let later = send(&fake, &token, "12345", &one("A@Example.com", 456, "off")).await;
    assert_eq!(later.status, 201);
    let contacts = fake.contacts();
    assert_eq!(contacts[&12345]["a@example.com"][&456], "off");
    assert_eq!(contacts[&12345]["a@example.com"][&789], "gold");
    assert_eq!(contacts[&12345]["b@example.com"][&456], "off");

    let recorded = &fake.requests()[0];
    assert_eq!(recorded.list_id, Some(12345));
    assert_eq!(recorded.status, 201);
    assert_eq!(recorded.contacts, Some(2));
    assert_eq!(recorded.body_bytes, body.to_string().len());
    assert_eq!(recorded.emails, ["a@example.com", "b@example.com"]);
}

#[tokio::test]
async fn a_rejected_email_gets_400_naming_it_and_nothing_is_applied() {
    let fake = start(Faults {
        reject_emails: ["bounce@example.com".into()].into(),
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    let body = json!([
        contact("a@example.com", &[(1, "on")]),
        contact("Bounce@Example.com", &[(1, "on")]),
    ]);
    let refused = send(&fake, &token, "12", &body).await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.body["error"], "ERROR_INVALID_PARAMETER");
    assert!(refused.body["message"]
        .as_str()
        .unwrap()
        .contains("Bounce@Example.com"));
    assert!(fake.contacts().is_empty());
}

#[tokio::test]
async fn an_unknown_list_gets_404() {
    let fake = start(Faults {
        unknown_lists: [404].into(),
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    let refused = send(&fake, &token, "404", &one("a@example.com", 1, "on")).await;
    assert_eq!(
        refused.body,
        json!({
            "status":404,
            "error":"ERROR_UNABLE_TO_LOCATE_RESOURCE",
            "message":"Unable to locate a resource associated with the listId supplied."
        })
    );
    assert_eq!(
        send(&fake, &token, "405", &one("a@example.com", 1, "on"))
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn a_body_over_the_size_limit_gets_404_like_an_unknown_list() {
    let small = one("a@example.com", 1, "on");
    let fake = start(Faults {
        max_body_bytes: Some(small.to_string().len()),
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    assert_eq!(send(&fake, &token, "12", &small).await.status, 201);
    let refused = send(&fake, &token, "12", &one("a@example.com", 1, "off")).await;
    assert_eq!(refused.status, 404);
    assert_eq!(refused.body["error"], "ERROR_UNABLE_TO_LOCATE_RESOURCE");
    assert_eq!(fake.value(12, "a@example.com", 1).as_deref(), Some("on"));
}

#[tokio::test]
async fn an_error_rate_of_one_answers_every_request_503_with_retry_after() {
    let fake = start(Faults {
        error_rate: 1.0,
        retry_after: Some(1500 * MS),
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    for _ in 0..5 {
        let refused = send(&fake, &token, "12", &one("a@example.com", 1, "on")).await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.headers[RETRY_AFTER], "2");
    }
    assert_eq!(fake.status_counts(), [(503, 5)].into());
    assert!(fake.contacts().is_empty());
}

#[tokio::test]
async fn requests_above_the_throttle_rate_get_429() {
    let rate = 3.0;
    let fake = start(Faults {
        throttle_rps: Some(rate),
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    let began = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(
            send(&fake, &token, "12", &one("a@example.com", 1, "on"))
                .await
                .status,
        );
    }
    // A burst of `rate`, plus whatever refilled while the requests were being sent.
    let allowed = rate + (rate * began.elapsed().as_secs_f64()).ceil();
    let accepted = statuses.iter().filter(|&&status| status == 201).count();
    let throttled = statuses.iter().filter(|&&status| status == 429).count();
    assert_eq!(accepted + throttled, 12, "{statuses:?}");
    assert_eq!(&statuses[..3], [201; 3]);
    assert!(accepted as f64 <= allowed, "{statuses:?}");
    assert!(throttled > 0, "{statuses:?}");
}

#[tokio::test]
async fn an_outage_answers_503_until_it_ends_then_requests_are_accepted() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    fake.update_faults(|faults| faults.outage_for = Some(300 * MS));
    assert!(fake.faults().outage_for.is_some());
    let during = send(&fake, &token, "12", &one("a@example.com", 1, "on")).await;
    assert_eq!(during.status, 503);
    assert!(during.headers.get(RETRY_AFTER).is_none());
    tokio::time::sleep(350 * MS).await;
    assert_eq!(fake.faults().outage_for, None);
    assert_eq!(
        send(&fake, &token, "12", &one("a@example.com", 1, "on"))
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let fake = start(Faults {
        latency: 100 * MS,
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    let sent = Instant::now();
    assert_eq!(
        send(&fake, &token, "12", &one("a@example.com", 1, "on"))
            .await
            .status,
        201
    );
    assert!(sent.elapsed() >= 100 * MS);
    let sent = Instant::now();
    assert_eq!(
        send_raw(&fake, None, "12", "application/json", "[]".into())
            .await
            .status,
        401
    );
    assert!(sent.elapsed() >= 100 * MS);
}

#[tokio::test]
async fn faults_put_while_running_change_the_answers() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    assert_eq!(
        send(&fake, &token, "12", &one("a@example.com", 1, "on"))
            .await
            .status,
        201
    );

    let put = control(
        &fake,
        reqwest::Method::PUT,
        "/_fake/faults",
        Some(json!({"unknown_lists": [12], "latency": "1ms", "retry_after": "2s"})),
    )
    .await;
    assert_eq!(put.status, 200);
    assert_eq!(put.body["unknown_lists"], json!([12]));
    assert_eq!(put.body["latency"], "1ms");
    assert_eq!(put.body["token_lifetime"], "15m");
    assert_eq!(
        send(&fake, &token, "12", &one("a@example.com", 1, "off"))
            .await
            .status,
        404
    );
    assert_eq!(fake.faults().retry_after, Some(Duration::from_secs(2)));

    let got = control(&fake, reqwest::Method::GET, "/_fake/faults", None).await;
    assert_eq!(got.body, put.body);

    let misspelt = control(
        &fake,
        reqwest::Method::PUT,
        "/_fake/faults",
        Some(json!({"errorRate": 1})),
    )
    .await;
    assert_eq!(misspelt.status, 400);
    assert!(misspelt.body["message"]
        .as_str()
        .unwrap()
        .contains("errorRate"));
    let out_of_range = control(
        &fake,
        reqwest::Method::PUT,
        "/_fake/faults",
        Some(json!({"error_rate": 2})),
    )
    .await;
    assert_eq!(out_of_range.status, 400);
    assert_eq!(fake.faults().unknown_lists, [12].into());

    control(
        &fake,
        reqwest::Method::PUT,
        "/_fake/faults",
        Some(json!({})),
    )
    .await;
    assert_eq!(
        send(&fake, &token, "12", &one("a@example.com", 1, "off"))
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn faults_patched_while_running_change_only_what_is_named() {
    let fake = start(Faults {
        unknown_lists: [7].into(),
        ..Faults::default()
    })
    .await;
    fake.update_faults(|faults| faults.outage_for = Some(Duration::from_secs(60)));
    let patched = control(
        &fake,
        reqwest::Method::PATCH,
        "/_fake/faults",
        Some(json!({"error_rate": 0.5, "retry_after": "1s"})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    let faults = fake.faults();
    assert_eq!(faults.error_rate, 0.5);
    assert_eq!(faults.retry_after, Some(Duration::from_secs(1)));
    assert_eq!(faults.unknown_lists, [7].into());
    assert!(faults.outage_for.unwrap() > Duration::from_secs(58));
    let misspelt = control(
        &fake,
        reqwest::Method::PATCH,
        "/_fake/faults",
        Some(json!({"latncy": "1s"})),
    )
    .await;
    assert_eq!(misspelt.status, 400);
    assert_eq!(fake.faults().error_rate, 0.5);
}

#[tokio::test]
async fn control_endpoints_show_contacts_and_requests_and_reset_clears_them() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    send(&fake, &token, "12", &one("a@example.com", 456, "on")).await;
    send(&fake, &token, "12", &json!([])).await;

    let contacts = control(&fake, reqwest::Method::GET, "/_fake/contacts", None).await;
    assert_eq!(
        contacts.body,
        json!({"12": {"a@example.com": {"456": "on"}}})
    );

    let requests = control(&fake, reqwest::Method::GET, "/_fake/requests", None).await;
    assert_eq!(requests.body["total"], 2);
    assert_eq!(requests.body["by_status"], json!({"201": 1, "400": 1}));
    assert_eq!(requests.body["tokens_issued"], 1);
    assert_eq!(requests.body["requests"][0]["list_id"], 12);
    assert_eq!(
        requests.body["requests"][0]["emails"],
        json!(["a@example.com"])
    );
    assert_eq!(
        requests.body["requests"][1]["error"],
        "ERROR_INVALID_PARAMETER"
    );
    assert!(requests.body["requests"][1]["elapsed_ms"].is_number());
    let last = control(&fake, reqwest::Method::GET, "/_fake/requests?limit=1", None).await;
    assert_eq!(last.body["total"], 2);
    assert_eq!(last.body["requests"].as_array().unwrap().len(), 1);
    assert_eq!(last.body["requests"][0]["status"], 400);

    let reset = control(&fake, reqwest::Method::POST, "/_fake/reset", None).await;
    assert_eq!(reset.status, 204);
    assert!(fake.contacts().is_empty());
    assert!(fake.requests().is_empty());
    assert_eq!(
        send(&fake, &token, "12", &one("a@example.com", 456, "off"))
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_get_listrak_envelopes() {
    let fake = start(Faults::default()).await;
    let unknown = control(&fake, reqwest::Method::GET, "/email/v1/Nothing", None).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["error"], "ERROR_UNKNOWN_ROUTE");
    let wrong_method = control(
        &fake,
        reqwest::Method::GET,
        "/email/v1/List/1/Contact/SegmentationField",
        None,
    )
    .await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.body["error"], "ERROR_UNSUPPORTED_METHOD");
}

#[tokio::test]
async fn state_can_be_read_from_a_cloned_handle_and_shutdown_stops_serving() {
    let fake = start(Faults::default()).await;
    let handle = fake.handle();
    let token = token(&fake).await;
    let kept_alive = client();
    let response = kept_alive
        .post(url(&fake, "3"))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, "application/json")
        .body(one("a@example.com", 1, "on").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(handle.value(3, "a@example.com", 1).as_deref(), Some("on"));

    let auth_url = fake.auth_url();
    tokio::time::timeout(Duration::from_secs(2), fake.shutdown())
        .await
        .expect("shutdown finishes promptly even with a kept-alive connection");
    assert!(client().post(auth_url).send().await.is_err());
    assert_eq!(handle.requests().len(), 1);
}

#[test]
fn options_never_show_the_client_secret() {
    let options = FakeOptions {
        client_secret: "s3cr3t-value".into(),
        ..FakeOptions::default()
    };
    let shown = format!("{options:?}");
    assert!(!shown.contains("s3cr3t-value"), "{shown}");
    assert!(shown.contains("fake-client-id"), "{shown}");
}

async fn start_with_catalogue() -> FakeServer {
    let options = FakeOptions {
        catalogue: super::CatalogueSeed::lists(&[(1001, "Customers")]),
        ..FakeOptions::default()
    };
    FakeServer::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("the fake starts")
}

async fn catalogue_call(
    fake: &FakeServer,
    token: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let mut request = client().request(method, format!("{}/{path}", fake.api_url()));
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(body) = body {
        request = request
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    answer(request.send().await.expect("catalogue request")).await
}

#[tokio::test]
async fn groups_and_fields_created_through_the_api_are_listed_in_listraks_envelopes() {
    let fake = start_with_catalogue().await;
    let token = token(&fake).await;
    let get =
        |path: &'static str| catalogue_call(&fake, Some(&token), reqwest::Method::GET, path, None);
    let lists = get("List").await;
    assert_eq!(lists.status, 200);
    assert_eq!(
        lists.body,
        json!({"status": 200, "data": [{"listId": 1001, "listName": "Customers"}]})
    );

    let group = catalogue_call(
        &fake,
        Some(&token),
        reqwest::Method::POST,
        "List/1001/SegmentationFieldGroup",
        Some(json!({"segmentationFieldGroupName": "Engage Audiences", "position": 1})),
    )
    .await;
    assert_eq!(group.status, 201, "{}", group.body);
    let group_id = group.body["resourceId"].as_str().unwrap().to_owned();
    let field = catalogue_call(
        &fake,
        Some(&token),
        reqwest::Method::POST,
        &format!("List/1001/SegmentationFieldGroup/{group_id}/SegmentationField"),
        Some(json!({
            "segmentationFieldName": "vip_customers",
            "dataType": "CheckBox",
            "maxLength": 3,
            "position": 1
        })),
    )
    .await;
    assert_eq!(field.status, 201, "{}", field.body);
    let field_id: u32 = field.body["resourceId"].as_str().unwrap().parse().unwrap();

    let fields = catalogue_call(
        &fake,
        Some(&token),
        reqwest::Method::GET,
        &format!("List/1001/SegmentationFieldGroup/{group_id}/SegmentationField"),
        None,
    )
    .await;
    assert_eq!(fields.body["data"][0]["segmentationFieldId"], field_id);
    assert_eq!(fields.body["data"][0]["dataType"], "CheckBox");
    assert_eq!(
        get("List/1001/SegmentationFieldGroup").await.body["data"][0]["segmentationFieldGroupName"],
        "Engage Audiences"
    );

    // Updates may now name that field, and no other.
    let accepted = send(&fake, &token, "1001", &one("a@example.com", field_id, "on")).await;
    assert_eq!(accepted.status, 201, "{}", accepted.body);
    let refused = send(
        &fake,
        &token,
        "1001",
        &one("a@example.com", field_id + 1, "on"),
    )
    .await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.body["error"], "ERROR_INVALID_PARAMETER");
    let message = refused.body["message"].as_str().unwrap();
    assert!(
        message.contains(
            "contactSegmentationFieldValues[0].segmentationFieldValues[0].segmentationFieldId"
        ) && message.contains("is not a profile field of list 1001"),
        "{message}"
    );
    let unknown_list = send(&fake, &token, "2002", &one("a@example.com", field_id, "on")).await;
    assert_eq!(unknown_list.status, 404);
}

#[tokio::test]
async fn catalogue_requests_are_checked_as_strictly_as_updates() {
    let fake = start_with_catalogue().await;
    let token = token(&fake).await;
    let cases = [
        (
            None,
            reqwest::Method::GET,
            "List",
            None,
            401,
            "ERROR_UNAUTHORIZED",
        ),
        (
            Some(token.as_str()),
            reqwest::Method::GET,
            "List/0/SegmentationFieldGroup",
            None,
            400,
            "ERROR_INVALID_PARAMETER",
        ),
        (
            Some(token.as_str()),
            reqwest::Method::GET,
            "List/2002/SegmentationFieldGroup",
            None,
            404,
            "ERROR_UNABLE_TO_LOCATE_RESOURCE",
        ),
        (
            Some(token.as_str()),
            reqwest::Method::GET,
            "List/1001/SegmentationFieldGroup/5/SegmentationField",
            None,
            404,
            "ERROR_UNABLE_TO_LOCATE_RESOURCE",
        ),
        (
            Some(token.as_str()),
            reqwest::Method::POST,
            "List/1001/SegmentationFieldGroup",
            Some(json!({"segmentationFieldGroupName": "x"})),
            400,
            "ERROR_INVALID_PARAMETER",
        ),
        (
            Some(token.as_str()),
            reqwest::Method::POST,
            "List/1001/SegmentationFieldGroup",
            Some(json!({"segmentationFieldGroupName": "", "position": 1})),
            400,
            "ERROR_INVALID_PARAMETER",
        ),
    ];
    for (token, method, path, body, status, error) in cases {
        let answer = catalogue_call(&fake, token, method.clone(), path, body.clone()).await;
        assert_eq!(
            answer.status, status,
            "{method} {path} {body:?}: {}",
            answer.body
        );
        assert_eq!(answer.body["error"], error, "{method} {path}");
        assert_eq!(answer.body["status"], status, "{method} {path}");
    }
    let group = catalogue_call(
        &fake,
        Some(&token),
        reqwest::Method::POST,
        "List/1001/SegmentationFieldGroup",
        Some(json!({"segmentationFieldGroupName": "g", "position": 1})),
    )
    .await;
    let group_id = group.body["resourceId"].as_str().unwrap().to_owned();
    let path = format!("List/1001/SegmentationFieldGroup/{group_id}/SegmentationField");
    let bad_type = catalogue_call(
        &fake,
        Some(&token),
        reqwest::Method::POST,
        &path,
        Some(json!({
            "segmentationFieldName": "f",
            "dataType": "Boolean",
            "maxLength": 3,
            "position": 1
        })),
    )
    .await;
    assert_eq!(bad_type.status, 400);
    assert!(bad_type.body["message"]
        .as_str()
        .unwrap()
        .contains("dataType"));
    let no_length = catalogue_call(
        &fake,
        Some(&token),
        reqwest::Method::POST,
        &path,
        Some(json!({"segmentationFieldName": "f", "dataType": "CheckBox", "position": 1})),
    )
    .await;
    assert_eq!(no_length.status, 400);
    assert!(no_length.body["message"]
        .as_str()
        .unwrap()
        .contains("maxLength"));
    let not_json = client()
        .post(format!("{}/{path}", fake.api_url()))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 415);
}

#[tokio::test]
async fn without_a_catalogue_any_list_and_field_is_accepted() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    let accepted = send(&fake, &token, "777", &one("a@example.com", 999, "on")).await;
    assert_eq!(accepted.status, 201);
    let lists = catalogue_call(&fake, Some(&token), reqwest::Method::GET, "List", None).await;
    assert_eq!(lists.body, json!({"status": 200, "data": []}));
}

/// The spec's `Contact`: `emailAddress` and `segmentationFieldValues` required, each value a
/// `SegmentationFieldValue` with an int32 `segmentationFieldId` and a string `value`.
fn assert_contact_shape(contact: &Value) {
    assert!(contact["emailAddress"].is_string(), "{contact}");
    let values = contact["segmentationFieldValues"]
        .as_array()
        .unwrap_or_else(|| panic!("segmentationFieldValues is an array: {contact}"));
    for value in values {
        let id = value["segmentationFieldId"]
            .as_i64()
            .expect("an integer id");
        assert!((1..=i64::from(i32::MAX)).contains(&id));
        assert!(value["value"].is_string(), "{value}");
    }
}

/// The spec's `Error`: `status`, `error`, `message`.
fn assert_error_shape(answer: &Answer, status: u16) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["status"], status);
    assert!(answer.body["error"].is_string(), "{}", answer.body);
    assert!(answer.body["message"].is_string(), "{}", answer.body);
}

async fn read(fake: &FakeServer, token: Option<&str>, path_and_query: &str) -> Answer {
    let mut request = client().get(format!("{}/List/{path_and_query}", fake.api_url()));
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    answer(request.send().await.expect("read request")).await
}

#[tokio::test]
async fn get_a_contact_answers_the_requested_fields_in_the_specs_shape() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    let body = json!([contact(
        "Alice@Example.com",
        &[(1, "on"), (2, "gold"), (3, "off")]
    )]);
    assert_eq!(send(&fake, &token, "7", &body).await.status, 201);

    let found = read(
        &fake,
        Some(&token),
        "7/Contact/alice@example.com?segmentationFieldIds=1,3,9",
    )
    .await;
    assert_eq!(found.status, 200, "{}", found.body);
    assert_eq!(found.body["status"], 200);
    assert_contact_shape(&found.body["data"]);
    assert_eq!(
        found.body["data"]["segmentationFieldValues"],
        json!([
            {"segmentationFieldId": 1, "value": "on"},
            {"segmentationFieldId": 3, "value": "off"}
        ])
    );

    let missing = read(
        &fake,
        Some(&token),
        "7/Contact/bob@example.com?segmentationFieldIds=1",
    )
    .await;
    assert_error_shape(&missing, 404);
    let no_token = read(&fake, None, "7/Contact/alice@example.com").await;
    assert_error_shape(&no_token, 401);
    let bad_fields = read(
        &fake,
        Some(&token),
        "7/Contact/alice@example.com?segmentationFieldIds=x",
    )
    .await;
    assert_error_shape(&bad_fields, 400);
    fake.shutdown().await;
}

#[tokio::test]
async fn get_all_contacts_pages_with_a_cursor_in_the_specs_shape() {
    let fake = start(Faults {
        unknown_lists: [99].into(),
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    let body: Vec<Value> = (0..25)
        .map(|i| contact(&format!("p{i:02}@example.com"), &[(4, "on")]))
        .collect();
    assert_eq!(send(&fake, &token, "7", &json!(body)).await.status, 201);

    let mut seen = Vec::new();
    let mut cursor = "Start".to_owned();
    let mut pages = 0;
    loop {
        let page = read(
            &fake,
            Some(&token),
            &format!("7/Contact?segmentationFieldIds=4&count=10&cursor={cursor}"),
        )
        .await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.body["status"], 200);
        pages += 1;
        for contact in page.body["data"].as_array().expect("data is an array") {
            assert_contact_shape(contact);
            seen.push(contact["emailAddress"].as_str().unwrap().to_owned());
        }
        match page.body["nextPageCursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    seen.dedup();
    assert_eq!(seen.len(), 25, "no contact on two pages");

    assert_error_shape(&read(&fake, Some(&token), "99/Contact").await, 404);
    assert_error_shape(&read(&fake, None, "7/Contact").await, 401);
    assert_error_shape(&read(&fake, Some(&token), "7/Contact?count=0").await, 400);
    fake.shutdown().await;
}

#[tokio::test]
async fn imports_complete_after_their_delay_in_any_order_and_reads_show_only_completed_ones() {
    let fake = start(Faults {
        import_delay_min: Duration::ZERO,
        import_delay_max: 300 * MS,
        ..Faults::default()
    })
    .await;
    let token = token(&fake).await;
    // Many accepted imports of one field: with random delays, the last accepted is not
    // always the last completed.
    for round in 0..40 {
        let value = format!("v{round}");
        assert_eq!(
            send(&fake, &token, "7", &one("a@example.com", 1, &value))
                .await
                .status,
            201
        );
    }
    assert!(fake.imports_pending() > 0, "imports wait for their delay");
    let started = Instant::now();
    while fake.imports_pending() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "imports complete"
        );
        tokio::time::sleep(20 * MS).await;
    }
    let value = fake
        .value(7, "a@example.com", 1)
        .expect("a value once imported");
    assert!(value.starts_with('v'));
    let read_back = read(
        &fake,
        Some(&token),
        "7/Contact/a@example.com?segmentationFieldIds=1",
    )
    .await;
    assert_eq!(
        read_back.body["data"]["segmentationFieldValues"][0]["value"],
        value
    );
    fake.shutdown().await;
}

#[tokio::test]
async fn a_field_edited_as_in_listraks_ui_shows_in_reads() {
    let fake = start(Faults::default()).await;
    let token = token(&fake).await;
    assert_eq!(
        send(&fake, &token, "7", &one("a@example.com", 1, "on"))
            .await
            .status,
        201
    );
    let edited = client()
        .put(format!(
            "http://{}/_fake/contacts/7/a@example.com/1",
            fake.addr()
        ))
        .body("off")
        .send()
        .await
        .unwrap();
    assert_eq!(edited.status(), 204);
    assert_eq!(fake.value(7, "a@example.com", 1).as_deref(), Some("off"));
    fake.edit_field(7, "B@example.com", 2, "gold");
    let read_back = read(
        &fake,
        Some(&token),
        "7/Contact/b@example.com?segmentationFieldIds=2",
    )
    .await;
    assert_eq!(
        read_back.body["data"]["segmentationFieldValues"][0]["value"],
        "gold"
    );
    fake.shutdown().await;
}
