//! Where a proxied connection wants to go, from the head it sends: an HTTP
//! proxy request. `CONNECT host:port` opens a tunnel (HTTPS, or any TCP the
//! policy allows); a request in absolute form (`GET http://host/path`) is
//! plain HTTP, forwarded in origin form. The head is the sandbox's: it is
//! read with a size bound and checked field by field, and anything that is
//! not one clear request is refused with the status the proxy answers.

/// The most bytes a request head may have.
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// The most header fields a head may have.
pub const MAX_HEADERS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A `CONNECT` tunnel: TLS for port 443, raw TCP otherwise.
    Connect,
    /// Plain HTTP through the proxy.
    Http,
}

impl Scheme {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Connect => "connect",
            Scheme::Http => "http",
        }
    }
}

/// A parsed proxy request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    /// Lower case, without a trailing dot; an IP address as written.
    pub host: String,
    pub port: u16,
    /// Plain HTTP: the request to send on, in origin form (`GET /path
    /// HTTP/1.1`, headers as sent but for the proxy's own), ending with the
    /// empty line. Empty for a tunnel.
    pub forward_head: Vec<u8>,
    /// Bytes after the head (a request body begun, or the tunnel's first
    /// bytes sent early).
    pub rest: Vec<u8>,
}

/// Why a head is refused: the status the proxy answers, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head is not complete yet: read more (within [`MAX_HEAD_BYTES`]).
    #[error("the request head is not complete")]
    Partial,
    #[error("400 {0}")]
    Bad(String),
    #[error("431 the request head is larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
}

impl HeadError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::Partial | HeadError::Bad(_) => 400,
            HeadError::TooLarge => 431,
        }
    }
}

/// Reads the head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Target, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|e| match e {
        httparse::Error::TooManyHeaders => {
            HeadError::Bad(format!("more than {MAX_HEADERS} header fields"))
        }
        other => HeadError::Bad(format!("not an HTTP request ({other})")),
    });
    let len = match status? {
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        httparse::Status::Partial => return Err(HeadError::Partial),
        httparse::Status::Complete(len) => len,
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let method = req.method.unwrap_or_default();
    let path = req.path.unwrap_or_default();
    let rest = buf[len..].to_vec();
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = authority(path, None)?;
        return Ok(Target {
            scheme: Scheme::Connect,
            host,
            port,
            forward_head: Vec::new(),
            rest,
        });
    }
    let Some(after) = strip_prefix_ignore_case(path, "http://") else {
        return Err(HeadError::Bad(
            if strip_prefix_ignore_case(path, "https://").is_some() {
                "an https:// URL is asked for with CONNECT, not through a plain request".into()
            } else {
                "a proxy request names the whole URL (http://host/path) or is a CONNECT".into()
            },
        ));
    };
    let (authority_part, origin) = match after.find(['/', '?']) {
        Some(i) if after.as_bytes()[i] == b'/' => (&after[..i], after[i..].to_string()),
        Some(i) => (&after[..i], format!("/{}", &after[i..])),
        None => (after, "/".to_string()),
    };
    if authority_part.contains('@') {
        return Err(HeadError::Bad(
            "credentials in the URL are not passed on".into(),
        ));
    }
    let (host, port) = authority(authority_part, Some(80))?;
    // A Host header naming somewhere else would let the request reach a
    // virtual host the decision was not about.
    let mut forward = format!("{method} {origin} HTTP/1.{}\r\n", req.version.unwrap_or(1));
    let mut saw_host = false;
    for h in req.headers.iter() {
        let name = h.name;
        // The proxy's own headers, and the connection's: each request is a
        // connection of its own (decided on its own), so it is closed after
        // the answer.
        if [
            "proxy-authorization",
            "proxy-connection",
            "connection",
            "keep-alive",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HeadError::Bad(format!("header {name} is not text")))?;
        if name.eq_ignore_ascii_case("host") {
            let (h_host, h_port) = authority(value.trim(), Some(80))?;
            if h_host != host || h_port != port {
                let (shown, _) =
                    super::super::harness::tools::text::cap_head_tail(value.as_bytes(), 200);
                return Err(HeadError::Bad(format!(
                    "the Host header ({shown:?}) names another host than the URL ({host}:{port})"
                )));
            }
            saw_host = true;
        }
        forward.push_str(name);
        forward.push_str(": ");
        forward.push_str(value);
        forward.push_str("\r\n");
    }
    if !saw_host {
        let shown = if port == 80 {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        forward.push_str(&format!("Host: {shown}\r\n"));
    }
    forward.push_str("Connection: close\r\n\r\n");
    Ok(Target {
        scheme: Scheme::Http,
        host,
        port,
        forward_head: forward.into_bytes(),
        rest,
    })
}

/// `head` (a request head ending with its empty line) with header `name`
/// set to `value`: every field of that name the client sent is dropped, and
/// the one line added before the empty line. `value` has no line break (the
/// config refuses one).
pub fn with_header(head: &[u8], name: &str, value: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines: Vec<&str> = text
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|line| {
            !line
                .split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .collect();
    let added = format!("{name}: {value}");
    lines.push(&added);
    let mut out = lines.join("\r\n");
    out.push_str("\r\n\r\n");
    out.into_bytes()
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `host:port` (or `[v6]:port`); without a port, `default` (none: the
/// port is required).
fn authority(s: &str, default: Option<u16>) -> Result<(String, u16), HeadError> {
    let bad = |why: &str| {
        let (shown, _) = crate::harness::tools::text::cap_head_tail(s.as_bytes(), 200);
        HeadError::Bad(format!("{shown:?}: {why}"))
    };
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address is closed by ]"))?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected text after the address")),
        };
        (addr.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match (port, default) {
        (Some(p), _) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the port is a number from 1 to 65535"))?,
        (None, Some(d)) => d,
        (None, None) => return Err(bad("CONNECT names host:port")),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host.len() > 253 {
        return Err(bad("the host is 1 to 253 characters"));
    }
    let plain = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'_'));
    if !plain {
        return Err(bad("the host has characters a host name cannot have"));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_names_host_and_port() {
        let t = parse(b"CONNECT PyPI.org.:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n\x16\x03\x01")
            .unwrap();
        assert_eq!(t.scheme, Scheme::Connect);
        assert_eq!((t.host.as_str(), t.port), ("pypi.org", 443));
        assert_eq!(t.rest, b"\x16\x03\x01", "early tunnel bytes are kept");
        let v6 = parse(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("2001:db8::1", 8443));
    }

    #[test]
    fn plain_http_is_forwarded_in_origin_form_without_proxy_headers() {
        let t = parse(
            b"GET http://Example.com:8080/simple/?q=1 HTTP/1.1\r\nHost: example.com:8080\r\n\
              Proxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\nbody",
        )
        .unwrap();
        assert_eq!(t.scheme, Scheme::Http);
        assert_eq!((t.host.as_str(), t.port), ("example.com", 8080));
        assert_eq!(
            String::from_utf8(t.forward_head).unwrap(),
            "GET /simple/?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(t.rest, b"body");
        let bare = parse(b"GET http://example.com?x HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(bare.port, 80);
        assert_eq!(
            String::from_utf8(bare.forward_head).unwrap(),
            "GET /?x HTTP/1.0\r\nHost: example.com\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn anything_unclear_is_refused() {
        let refused = |head: &[u8]| match parse(head) {
            Err(HeadError::Bad(why)) => why,
            other => panic!(
                "{:?} was not refused: {other:?}",
                String::from_utf8_lossy(head)
            ),
        };
        assert!(refused(b"GET /local HTTP/1.1\r\n\r\n").contains("whole URL"));
        assert!(refused(b"GET https://x.org/ HTTP/1.1\r\n\r\n").contains("CONNECT"));
        assert!(refused(b"CONNECT x.org HTTP/1.1\r\n\r\n").contains("host:port"));
        assert!(refused(b"CONNECT x.org:0 HTTP/1.1\r\n\r\n").contains("port"));
        assert!(refused(b"CONNECT x.org:99999 HTTP/1.1\r\n\r\n").contains("port"));
        assert!(
            refused(b"GET http://a.org/ HTTP/1.1\r\nHost: b.org\r\n\r\n").contains("another host")
        );
        assert!(refused(b"GET http://user:pw@a.org/ HTTP/1.1\r\n\r\n").contains("credentials"));
        assert!(refused(b"CONNECT a%2eorg:443 HTTP/1.1\r\n\r\n").contains("characters"));
        assert!(refused(b"\x16\x03\x01\x00\x05hello").contains("not an HTTP request"));
        assert_eq!(
            parse(b"CONNECT x.org:443 HTTP/1.1\r\nHost"),
            Err(HeadError::Partial)
        );
        let huge = [
            b"GET http://a.org/ HTTP/1.1\r\nX: ".as_slice(),
            &[b'a'; MAX_HEAD_BYTES],
        ]
        .concat();
        assert_eq!(parse(&huge), Err(HeadError::TooLarge));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X{i}: y\r\n"))
            .collect();
        let head = format!("GET http://a.org/ HTTP/1.1\r\n{many}\r\n");
        assert!(refused(head.as_bytes()).contains("header fields"));
    }
}
