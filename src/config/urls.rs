//! The rules of the URL settings (their schemes, whether paths are appended) and the one
//! check they share.

/// What a URL setting must look like.
pub(super) struct UrlRule {
    schemes: &'static [&'static str],
    /// Request paths are appended to it, so it cannot have a query or a fragment.
    base: bool,
}

pub(super) const AMQP_URL: UrlRule = UrlRule {
    schemes: &["amqp", "amqps"],
    base: false,
};
pub(super) const ENDPOINT_URL: UrlRule = UrlRule {
    schemes: &["http", "https"],
    base: false,
};
pub(super) const BASE_URL: UrlRule = UrlRule {
    schemes: &["http", "https"],
    base: true,
};

/// The minimal check the worker needs: a known scheme, a host, a valid port, nothing
/// that cannot be in a URL. The value is not quoted in the reason: it may hold a password.
pub(super) fn check_url(url: &str, rule: &UrlRule) -> Result<(), String> {
    let schemes = rule.schemes;
    let expected = schemes
        .iter()
        .map(|scheme| format!("{scheme}://"))
        .collect::<Vec<_>>()
        .join(" or ");
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("is not a URL: it must start with {expected}"));
    };
    if !schemes
        .iter()
        .any(|known| known.eq_ignore_ascii_case(scheme))
    {
        return Err(format!("must start with {expected}"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace".to_owned());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("has an unclosed `[` in its host")?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(after.strip_prefix(':').ok_or("has junk after its host")?),
            ),
        }
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    if let Some(port) = port {
        if !port.is_empty() && port.parse::<u16>().is_err() {
            return Err("has a port that is not a number from 0 to 65535".to_owned());
        }
    }
    if rule.base && url.contains(['?', '#']) {
        return Err(
            "must not have a query or a fragment: request paths are appended to it".to_owned(),
        );
    }
    Ok(())
}
