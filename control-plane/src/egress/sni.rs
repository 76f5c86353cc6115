//! The server name a TLS client asks for, read from its ClientHello without
//! decrypting anything (the ClientHello is sent in the clear). The proxy
//! reads the first record of a CONNECT tunnel to port 443 and checks that
//! the name matches the host the tunnel was allowed for, so that a tunnel
//! opened to an allowed host cannot carry TLS for another (domain fronting
//! through a shared address).

use tls_parser::{
    parse_tls_extensions, parse_tls_plaintext, SNIType, TlsExtension, TlsMessage,
    TlsMessageHandshake,
};

/// What the first bytes of a tunnel say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not all of the first record is there yet: read more (a record is at
    /// most 16 KiB and 5 bytes).
    Partial,
    /// A ClientHello naming this server (lower case, no trailing dot).
    Server(String),
    /// A ClientHello without a server name.
    NoName,
    /// Not a TLS ClientHello.
    NotTls,
    /// A ClientHello with Encrypted Client Hello: the name that matters is
    /// hidden, so the tunnel cannot be checked.
    Ech,
}

/// The most bytes a first record can take.
pub const MAX_RECORD_BYTES: usize = 5 + (16 << 10) + 2048;

/// Reads the ClientHello at the start of `buf`.
pub fn server_name(buf: &[u8]) -> Hello {
    // A handshake record: type 22, version 3.x.
    match buf {
        [] => return Hello::Partial,
        [22] | [22, 3] => return Hello::Partial,
        [22, 3, ..] => {}
        _ => return Hello::NotTls,
    }
    let record = match parse_tls_plaintext(buf) {
        Ok((_, record)) => record,
        Err(tls_parser::Err::Incomplete(_)) if buf.len() < MAX_RECORD_BYTES => {
            return Hello::Partial
        }
        Err(_) => return Hello::NotTls,
    };
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))) = record.msg.first()
    else {
        return Hello::NotTls;
    };
    let Some(ext) = hello.ext else {
        return Hello::NoName;
    };
    let Ok((_, extensions)) = parse_tls_extensions(ext) else {
        return Hello::NotTls;
    };
    if extensions
        .iter()
        .any(|e| matches!(e, TlsExtension::Unknown(t, _) if t.0 == 0xfe0d))
    {
        return Hello::Ech;
    }
    for extension in extensions {
        if let TlsExtension::SNI(names) = extension {
            for (kind, name) in names {
                if kind == SNIType::HostName {
                    return match std::str::from_utf8(name) {
                        Ok(name) if !name.is_empty() && name.len() <= 253 => {
                            Hello::Server(name.trim_end_matches('.').to_ascii_lowercase())
                        }
                        _ => Hello::NotTls,
                    };
                }
            }
        }
    }
    Hello::NoName
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A TLS 1.2-style ClientHello record with `name` as its SNI (or none).
    pub fn client_hello(name: Option<&str>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = name {
            let n = name.as_bytes();
            let list_len = 3 + n.len();
            ext.extend_from_slice(&[0x00, 0x00]); // server_name
            ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
            ext.extend_from_slice(&(list_len as u16).to_be_bytes());
            ext.push(0); // host_name
            ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
            ext.extend_from_slice(n);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut handshake = vec![0x01];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::client_hello;
    use super::*;

    #[test]
    fn the_server_name_is_read_from_a_client_hello() {
        let hello = client_hello(Some("Files.PythonHosted.org"));
        assert_eq!(
            server_name(&hello),
            Hello::Server("files.pythonhosted.org".into())
        );
        assert_eq!(server_name(&client_hello(None)), Hello::NoName);
        // Byte by byte, it is partial until the record is whole.
        for cut in 0..hello.len() {
            assert_eq!(server_name(&hello[..cut]), Hello::Partial, "cut at {cut}");
        }
    }

    #[test]
    fn encrypted_client_hello_is_told_apart() {
        let mut hello = client_hello(Some("allowed.test"));
        // An ECH extension (0xfe0d) appended: the lengths grow with it.
        let ech = [0xfe, 0x0d, 0x00, 0x02, 0x00, 0x00];
        hello.extend_from_slice(&ech);
        let grow = |at: usize, width: usize, by: usize, hello: &mut Vec<u8>| {
            let mut n = 0usize;
            for b in &hello[at..at + width] {
                n = n << 8 | usize::from(*b);
            }
            let bytes = (n + by).to_be_bytes();
            hello[at..at + width].copy_from_slice(&bytes[bytes.len() - width..]);
        };
        grow(3, 2, ech.len(), &mut hello); // record
        grow(6, 3, ech.len(), &mut hello); // handshake
        let ext_len_at = hello.len() - ech.len() - (3 + "allowed.test".len() + 2 + 2 + 2) - 2;
        grow(ext_len_at, 2, ech.len(), &mut hello); // extensions
        assert_eq!(server_name(&hello), Hello::Ech);
    }

    #[test]
    fn other_bytes_are_not_tls() {
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls);
        assert_eq!(server_name(b"SSH-2.0-OpenSSH_9.6\r\n"), Hello::NotTls);
        let mut broken = client_hello(Some("a.org"));
        broken[6] = 0xff; // a handshake length past the record
        assert_eq!(server_name(&broken), Hello::NotTls);
        // A record that claims more than a record may hold never completes.
        let mut endless = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        endless.resize(MAX_RECORD_BYTES + 1, 0);
        assert_eq!(server_name(&endless), Hello::NotTls);
    }
}
