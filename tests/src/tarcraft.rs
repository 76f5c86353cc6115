//! Hand-made tar archives, including the hostile ones a well-behaved
//! writer refuses to produce (`..` paths, absolute paths, links out,
//! devices, setuid bits, a PAX size that disagrees with the ustar one).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    Fifo,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::Hardlink => b'1',
            Kind::Symlink => b'2',
            Kind::CharDevice => b'3',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        }
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    /// A PAX `size` record overriding the ustar size field.
    pub pax_size: Option<u64>,
}

impl Entry {
    pub fn file(name: &str, data: &[u8]) -> Self {
        Self {
            name: name.as_bytes().to_vec(),
            kind: Kind::File,
            mode: 0o644,
            link: Vec::new(),
            data: data.to_vec(),
            pax_size: None,
        }
    }

    pub fn dir(name: &str) -> Self {
        Self {
            kind: Kind::Dir,
            mode: 0o755,
            ..Self::file(name, b"")
        }
    }

    pub fn symlink(name: &str, target: &str) -> Self {
        Self {
            kind: Kind::Symlink,
            mode: 0o777,
            link: target.as_bytes().to_vec(),
            ..Self::file(name, b"")
        }
    }

    pub fn hardlink(name: &str, target: &str) -> Self {
        Self {
            kind: Kind::Hardlink,
            link: target.as_bytes().to_vec(),
            ..Self::file(name, b"")
        }
    }

    pub fn with_mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }
}

fn octal(field: &mut [u8], value: u64) {
    let s = format!("{:0width$o}\0", value, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

fn header(name: &[u8], kind: u8, mode: u32, size: u64, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], 1000);
    octal(&mut h[116..124], 1000);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = kind;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|b| *b as u64).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % 512;
    if rem != 0 {
        out.resize(out.len() + 512 - rem, 0);
    }
}

/// Serializes entries exactly as given, without any validation.
pub fn build(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if let Some(size) = e.pax_size {
            let record = format!("size={size}\n");
            let record = format!(
                "{} {}",
                record.len() + 1 + (record.len() + 1).to_string().len(),
                record
            );
            out.extend_from_slice(&header(
                b"././@PaxHeader",
                b'x',
                0o644,
                record.len() as u64,
                b"",
            ));
            out.extend_from_slice(record.as_bytes());
            pad(&mut out);
        }
        let size = if e.kind == Kind::File {
            e.data.len() as u64
        } else {
            0
        };
        out.extend_from_slice(&header(&e.name, e.kind.flag(), e.mode, size, &e.link));
        if e.kind == Kind::File {
            out.extend_from_slice(&e.data);
            pad(&mut out);
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}
