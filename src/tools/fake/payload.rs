//! Reading what clients send, strictly per Listrak's spec: the SegmentationField body, the token
//! form, ids and headers.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::stages::decode::kind_of;

use super::answer::{self, Refusal};
use axum::http::StatusCode;

/// The request body's name in Listrak's spec, used to point at what was wrong.
const BODY: &str = "contactSegmentationFieldValues";

/// One contact's field values, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactValues {
    pub email: String,
    pub fields: Vec<(u32, String)>,
}

/// A SegmentationField body read once: what the record shows, and whether the spec holds.
#[derive(Debug)]
pub struct Payload {
    /// How many contacts the array holds, when the body is a JSON array.
    pub contacts: Option<usize>,
    /// Every string `emailAddress` in the array, as sent, even when the body is invalid.
    pub emails: Vec<String>,
    pub checked: Result<Vec<ContactValues>, Refusal>,
}

impl Payload {
    /// Unknown properties are ignored, as the spec's schemas allow (no
    /// `additionalProperties: false`, and new model fields are "not breaking" changes); every
    /// documented property is checked strictly, without the coercions a .NET binder might do.
    pub fn read(body: &[u8]) -> Self {
        well_formed(body).unwrap_or_else(|| Self::read_generic(body))
    }

    /// Reads any JSON at all, to say exactly what is wrong with it.
    fn read_generic(body: &[u8]) -> Self {
        let value: Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(err) => {
                return Self {
                    contacts: None,
                    emails: Vec::new(),
                    checked: Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        answer::MALFORMED_REQUEST_BODY,
                        format!("Invalid JSON body was supplied: {err}."),
                    )),
                }
            }
        };
        let (contacts, emails) = match &value {
            Value::Array(items) => (
                Some(items.len()),
                items
                    .iter()
                    .filter_map(|item| item.get("emailAddress")?.as_str())
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => (None, Vec::new()),
        };
        Self {
            contacts,
            emails,
            checked: check_body(value),
        }
    }
}

/// A contact read straight into its documented shape (unknown properties ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContactShape {
    email_address: String,
    segmentation_field_values: Vec<FieldValueShape>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldValueShape {
    segmentation_field_id: i64,
    value: String,
}

/// The common case, a valid body, read without building a generic tree first (the fake
/// reads every body a benchmark sends). `None` as soon as anything is off; the generic
/// reading then finds what and words the refusal, so both readings agree on every body.
fn well_formed(body: &[u8]) -> Option<Payload> {
    let contacts: Vec<ContactShape> = serde_json::from_slice(body).ok()?;
    if contacts.is_empty() {
        return None;
    }
    let emails = contacts
        .iter()
        .map(|contact| contact.email_address.clone())
        .collect();
    let count = contacts.len();
    let checked = contacts
        .into_iter()
        .map(|contact| {
            if !is_plausible_email(&contact.email_address)
                || contact.segmentation_field_values.is_empty()
            {
                return None;
            }
            let mut fields: Vec<(u32, String)> =
                Vec::with_capacity(contact.segmentation_field_values.len());
            for value in contact.segmentation_field_values {
                let field = positive_int32(value.segmentation_field_id)?;
                if fields.iter().any(|(seen, _)| *seen == field) {
                    return None;
                }
                fields.push((field, value.value));
            }
            Some(ContactValues {
                email: contact.email_address,
                fields,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Payload {
        contacts: Some(count),
        emails,
        checked: Ok(checked),
    })
}

fn check_body(value: Value) -> Result<Vec<ContactValues>, Refusal> {
    let Value::Array(items) = value else {
        return Err(Refusal::invalid(
            BODY,
            format!("expected an array of contacts, found {}", kind_of(&value)),
        ));
    };
    if items.is_empty() {
        return Err(Refusal::invalid(BODY, "at least one contact is required"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| check_contact(index, item))
        .collect()
}

fn check_contact(index: usize, item: Value) -> Result<ContactValues, Refusal> {
    let at = format!("{BODY}[{index}]");
    let Value::Object(mut contact) = item else {
        return Err(Refusal::invalid(
            &at,
            format!("expected a contact object, found {}", kind_of(&item)),
        ));
    };
    let email = match required(&mut contact, &at, "emailAddress")? {
        Value::String(email) if is_plausible_email(&email) => email,
        Value::String(email) => {
            return Err(Refusal::invalid(
                &format!("{at}.emailAddress"),
                format!("{email:?} is not an email address"),
            ))
        }
        other => return Err(wrong_type(&at, "emailAddress", "a string", &other)),
    };
    let values = match required(&mut contact, &at, "segmentationFieldValues")? {
        Value::Array(values) if values.is_empty() => {
            return Err(Refusal::invalid(
                &format!("{at}.segmentationFieldValues"),
                "at least one profile field value is required",
            ))
        }
        Value::Array(values) => values,
        other => {
            return Err(wrong_type(
                &at,
                "segmentationFieldValues",
                "an array",
                &other,
            ))
        }
    };
    let mut fields: Vec<(u32, String)> = Vec::with_capacity(values.len());
    for (position, value) in values.into_iter().enumerate() {
        let (field, text) =
            check_field_value(&format!("{at}.segmentationFieldValues[{position}]"), value)?;
        if fields.iter().any(|(seen, _)| *seen == field) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                answer::SEGMENTATION_FIELD_DEFINED_TWICE,
                format!(
                    "Two or more values were supplied for segmentationFieldId {field} in {at}."
                ),
            ));
        }
        fields.push((field, text));
    }
    Ok(ContactValues { email, fields })
}

fn check_field_value(at: &str, value: Value) -> Result<(u32, String), Refusal> {
    let Value::Object(mut value) = value else {
        return Err(Refusal::invalid(
            at,
            format!(
                "expected a profile field value object, found {}",
                kind_of(&value)
            ),
        ));
    };
    let field = match required(&mut value, at, "segmentationFieldId")? {
        Value::Number(number) => match number.as_i64().and_then(positive_int32) {
            Some(field) => field,
            None => {
                return Err(Refusal::invalid(
                    &format!("{at}.segmentationFieldId"),
                    format!("{number} is not a positive 32-bit integer"),
                ))
            }
        },
        other => return Err(wrong_type(at, "segmentationFieldId", "an integer", &other)),
    };
    let text = match required(&mut value, at, "value")? {
        Value::String(text) => text,
        other => return Err(wrong_type(at, "value", "a string", &other)),
    };
    Ok((field, text))
}

fn required(object: &mut Map<String, Value>, at: &str, property: &str) -> Result<Value, Refusal> {
    object
        .remove(property)
        .ok_or_else(|| Refusal::invalid(&format!("{at}.{property}"), "the property is required"))
}

fn wrong_type(at: &str, property: &str, expected: &str, found: &Value) -> Refusal {
    Refusal::invalid(
        &format!("{at}.{property}"),
        format!("expected {expected}, found {}", kind_of(found)),
    )
}

/// Listrak's ids are `int32`: 1..=i32::MAX.
fn positive_int32(value: i64) -> Option<u32> {
    crate::stages::model::ListId::new(value).map(|id| id.get())
}

/// The `{listId}` path segment as a positive int32, the only form Listrak routes.
pub fn list_id(segment: &str) -> Option<u32> {
    segment
        .parse::<i64>()
        .ok()
        .filter(|_| segment.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(positive_int32)
}

/// One `@` between a non-empty local part and a dotted domain, no spaces or controls, within
/// the length limits of RFC 5321: what a list import would plausibly accept.
pub fn is_plausible_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    let labels_ok = domain.split('.').count() >= 2
        && domain.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"@<>()[]\\,;:\"".contains(c));
    text.len() <= 254 && local_ok && labels_ok
}

/// The token from `Authorization: Bearer <token>` (the scheme is case-insensitive).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether a `Content-Type` names `essence` (`application/json`), parameters such as
/// `charset` allowed.
pub fn content_type_is(content_type: Option<&str>, essence: &str) -> bool {
    content_type
        .and_then(|value| value.split(';').next())
        .is_some_and(|found| found.trim().eq_ignore_ascii_case(essence))
}

/// The pairs of an `application/x-www-form-urlencoded` body, decoded; `None` when it is not
/// UTF-8 or holds a broken escape.
pub fn form_pairs(body: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((form_decode(name)?, form_decode(value)?))
        })
        .collect()
}

fn form_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = rest.get(..2)?;
                let hex = std::str::from_utf8(hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &rest[2..];
            }
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: &str) -> Refusal {
        Payload::read(body.as_bytes()).checked.unwrap_err()
    }

    #[test]
    fn the_direct_reading_agrees_with_the_generic_one_and_leaves_every_fault_to_it() {
        let valid = [
            concat!(
                r#"[{"emailAddress":"a@example.com","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":456,"value":"on"},"#,
                r#"{"segmentationFieldId":789,"value":""}]}]"#
            ),
            concat!(
                r#"[{"segmentationFieldValues":"#,
                r#"[{"value":"off","segmentationFieldId":1,"x":null}],"#,
                r#""emailAddress":"b@example.com","extra":[1]}]"#
            ),
        ];
        for body in valid {
            let direct = well_formed(body.as_bytes()).expect(body);
            let generic = Payload::read_generic(body.as_bytes());
            assert_eq!(format!("{direct:?}"), format!("{generic:?}"), "{body}");
        }
        let faulty = [
            "[]",
            "{}",
            "not json",
            concat!(
                r#"[{"emailAddress":"not an address","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":1,"value":"on"}]}]"#
            ),
            r#"[{"emailAddress":"a@example.com","segmentationFieldValues":[]}]"#,
            concat!(
                r#"[{"emailAddress":"a@example.com","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":0,"value":"on"}]}]"#
            ),
            concat!(
                r#"[{"emailAddress":"a@example.com","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":2147483648,"value":"on"}]}]"#
            ),
            concat!(
                r#"[{"emailAddress":"a@example.com","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":1.0,"value":"on"}]}]"#
            ),
            concat!(
                r#"[{"emailAddress":"a@example.com","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":1,"value":"on"},"#,
                r#"{"segmentationFieldId":1,"value":"off"}]}]"#
            ),
            concat!(
                r#"[{"emailAddress":"a@example.com","emailAddress":"b@example.com","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":1,"value":"on"}]}]"#
            ),
            concat!(
                r#"[{"emailAddress":null,"segmentationFieldValues":[{"segmentationFieldId":1,"#,
                r#""value":"on"}]}]"#
            ),
            concat!(
                r#"[{"emailAddress":"a@example.com","#,
                r#""segmentationFieldValues":[{"segmentationFieldId":1,"value":true}]}]"#
            ),
        ];
        for body in faulty {
            assert!(well_formed(body.as_bytes()).is_none(), "{body}");
        }
    }

    #[test]
    fn a_valid_body_yields_every_contact_and_field_in_order() {
        let payload = Payload::read(
            br#"[{"emailAddress":"a@example.com",
                  "segmentationFieldValues":[{"segmentationFieldId":456,"value":"on"},
                                             {"segmentationFieldId":789,"value":""}]},
                 {"emailAddress":"b@example.com",
                  "segmentationFieldValues":[{"segmentationFieldId":456,"value":"off"}],
                  "extra":1}]"#,
        );
        assert_eq!(payload.contacts, Some(2));
        assert_eq!(payload.emails, ["a@example.com", "b@example.com"]);
        assert_eq!(
            payload.checked.unwrap(),
            [
                ContactValues {
                    email: "a@example.com".into(),
                    fields: vec![(456, "on".into()), (789, String::new())],
                },
                ContactValues {
                    email: "b@example.com".into(),
                    fields: vec![(456, "off".into())],
                },
            ]
        );
    }

    #[test]
    fn bodies_that_break_the_schema_are_refused_with_the_place_named() {
        let cases = [
            (
                r#"{"emailAddress":"a@example.com"}"#,
                "contactSegmentationFieldValues: expected an array",
            ),
            ("[]", "at least one contact"),
            (
                "[1]",
                "contactSegmentationFieldValues[0]: expected a contact object",
            ),
            (
                r#"[{"segmentationFieldValues":[{"segmentationFieldId":1,"value":"on"}]}]"#,
                "[0].emailAddress: the property is required",
            ),
            (
                concat!(
                    r#"[{"emailAddress":null,"segmentationFieldValues":[{"segmentationFieldId":1,"#,
                    r#""value":"on"}]}]"#
                ),
                "[0].emailAddress: expected a string, found null",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"not-an-email","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":1,"value":"on"}]}]"#
                ),
                "\"not-an-email\" is not an email address",
            ),
            (
                r#"[{"emailAddress":"a@example.com"}]"#,
                "[0].segmentationFieldValues: the property is required",
            ),
            (
                r#"[{"emailAddress":"a@example.com","segmentationFieldValues":[]}]"#,
                "at least one profile field value",
            ),
            (
                r#"[{"emailAddress":"a@example.com","segmentationFieldValues":{}}]"#,
                "expected an array, found an object",
            ),
            (
                r#"[{"emailAddress":"a@example.com","segmentationFieldValues":[{"value":"on"}]}]"#,
                "segmentationFieldValues[0].segmentationFieldId: the property is required",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"a@example.com","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":0,"value":"on"}]}]"#
                ),
                "0 is not a positive 32-bit integer",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"a@example.com","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":-4,"value":"on"}]}]"#
                ),
                "-4 is not a positive 32-bit integer",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"a@example.com","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":2147483648,"#,
                    r#""value":"on"}]}]"#
                ),
                "2147483648 is not a positive 32-bit integer",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"a@example.com","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":1.5,"value":"on"}]}]"#
                ),
                "1.5 is not a positive 32-bit integer",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"a@example.com","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":"456","value":"on"}]}]"#
                ),
                "segmentationFieldId: expected an integer, found a string",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"a@example.com","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":456}]}]"#
                ),
                "[0].value: the property is required",
            ),
            (
                concat!(
                    r#"[{"emailAddress":"a@example.com","#,
                    r#""segmentationFieldValues":[{"segmentationFieldId":456,"value":true}]}]"#
                ),
                "[0].value: expected a string, found a boolean",
            ),
        ];
        for (body, expected) in cases {
            let refusal = refusal(body);
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(refusal.error, answer::INVALID_PARAMETER, "{body}");
            assert!(
                refusal.message.contains(expected),
                "{body}: {}",
                refusal.message
            );
        }
    }

    #[test]
    fn a_body_that_is_not_json_is_malformed() {
        let refusal = refusal("[{");
        assert_eq!(refusal.error, answer::MALFORMED_REQUEST_BODY);
    }

    #[test]
    fn one_field_twice_for_one_contact_is_refused() {
        let refusal = refusal(concat!(
            r#"[{"emailAddress":"a@example.com","#,
            r#""segmentationFieldValues":[{"segmentationFieldId":4,"value":"on"},"#,
            r#"{"segmentationFieldId":4,"value":"off"}]}]"#
        ));
        assert_eq!(refusal.error, answer::SEGMENTATION_FIELD_DEFINED_TWICE);
        assert!(
            refusal.message.contains("segmentationFieldId 4"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn invalid_bodies_still_show_their_contacts_and_emails() {
        let payload = Payload::read(br#"[{"emailAddress":"a@example.com"},{"emailAddress":7}]"#);
        assert_eq!(payload.contacts, Some(2));
        assert_eq!(payload.emails, ["a@example.com"]);
        assert!(payload.checked.is_err());
    }

    #[test]
    fn plausible_emails_are_told_from_implausible_ones() {
        for email in [
            "a@example.com",
            "first.last+tag@sub.example.co.uk",
            "ü@exämple.de",
        ] {
            assert!(is_plausible_email(email), "{email}");
        }
        for email in [
            "",
            "a",
            "@example.com",
            "a@",
            "a@example",
            "a@@example.com",
            "a b@example.com",
            "a@example..com",
            ".a@example.com",
            "a@-example.com",
            "a@example.com ",
            "<a@example.com>",
        ] {
            assert!(!is_plausible_email(email), "{email}");
        }
    }

    #[test]
    fn list_ids_are_positive_int32_digits_only() {
        assert_eq!(list_id("12345"), Some(12345));
        assert_eq!(list_id("2147483647"), Some(2147483647));
        for segment in ["0", "-1", "+5", "2147483648", "abc", "1.0", ""] {
            assert_eq!(list_id(segment), None, "{segment}");
        }
    }

    #[test]
    fn bearer_tokens_are_read_whatever_the_scheme_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn content_types_allow_parameters_but_not_other_media() {
        assert!(content_type_is(
            Some("application/json"),
            "application/json"
        ));
        assert!(content_type_is(
            Some("Application/JSON; charset=utf-8"),
            "application/json"
        ));
        assert!(!content_type_is(Some("text/plain"), "application/json"));
        assert!(!content_type_is(
            Some("application/json-patch+json"),
            "application/json"
        ));
        assert!(!content_type_is(None, "application/json"));
    }

    #[test]
    fn form_bodies_decode_plus_and_percent_escapes() {
        assert_eq!(
            form_pairs(b"grant_type=client_credentials&client_id=a+b&client_secret=%2F%3D%26x")
                .unwrap(),
            [
                ("grant_type".to_string(), "client_credentials".to_string()),
                ("client_id".to_string(), "a b".to_string()),
                ("client_secret".to_string(), "/=&x".to_string()),
            ]
        );
        assert_eq!(form_pairs(b"a=%zz"), None);
        assert_eq!(form_pairs(b"a=%2"), None);
    }
}
