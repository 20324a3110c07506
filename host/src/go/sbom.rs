//! The SPDX 2.3 SBOM of a ko image, from the Go build information the
//! linker embeds in every binary (what `go version -m` prints): the Go
//! version, the main module, every dependency with its version and `h1:`
//! sum, and the build settings. Read from the binary's bytes, so nothing is
//! run, and written without timestamps, so the same binary on the same
//! image always gives the same document.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::image::sbom::{package, relationship};
use crate::oci::Digest;

/// The header the linker puts before the build information (Go ≥ 1.18
/// writes the strings inline after a 32-byte header, flag bit 2).
const MAGIC: &[u8] = b"\xff Go buildinf:";
const HEADER: usize = 32;
const INLINE: u8 = 0x2;

/// One module of the build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    pub path: String,
    pub version: String,
    /// `h1:<base64 sha256>`, absent for the main module.
    pub sum: Option<String>,
}

/// What a Go binary says about its own build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    pub go_version: String,
    /// The main package's import path.
    pub path: String,
    pub main: Option<ModuleInfo>,
    pub deps: Vec<ModuleInfo>,
    /// `key=value` build settings (`-trimpath=true`, `GOARCH=amd64`, …).
    pub settings: Vec<String>,
}

/// The build information in `binary`, if it has any in a form we read.
/// Only the linker's `.go.buildinfo` section is read: the same bytes in the
/// program's own data (a module is untrusted) cannot stand in for it.
pub fn build_info(binary: &[u8]) -> Option<BuildInfo> {
    let section = elf_section(binary, b".go.buildinfo")?;
    let header = section.get(..HEADER)?;
    if !header.starts_with(MAGIC) || header[15] & INLINE == 0 {
        return None;
    }
    let mut rest = &section[HEADER..];
    let go_version = String::from_utf8(read_bytes(&mut rest)?.to_vec()).ok()?;
    let modinfo = read_bytes(&mut rest)?;
    // The module text sits between two 16-byte sentinels (binary, not text).
    let modinfo = match modinfo.len() {
        n if n >= 33 && modinfo[n - 17] == b'\n' => &modinfo[16..n - 16],
        _ => &[],
    };
    let modinfo = std::str::from_utf8(modinfo).ok()?;
    let mut info = BuildInfo {
        go_version,
        path: String::new(),
        main: None,
        deps: Vec::new(),
        settings: Vec::new(),
    };
    for line in modinfo.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let module = |f: &[&str]| ModuleInfo {
            path: f.get(1).copied().unwrap_or_default().to_owned(),
            version: f.get(2).copied().unwrap_or_default().to_owned(),
            sum: f.get(3).filter(|s| !s.is_empty()).map(|s| (*s).to_owned()),
        };
        match fields[0] {
            "path" => info.path = fields.get(1).copied().unwrap_or_default().to_owned(),
            "mod" => info.main = Some(module(&fields)),
            "dep" => info.deps.push(module(&fields)),
            // A replacement stands for the module before it.
            "=>" => {
                if let Some(last) = info.deps.last_mut() {
                    *last = module(&fields);
                }
            }
            "build" => info
                .settings
                .push(fields.get(1).copied().unwrap_or_default().to_owned()),
            _ => {}
        }
    }
    Some(info)
}

/// The bytes of the ELF section called `name` (32- or 64-bit, either byte
/// order), bounds-checked throughout.
fn elf_section<'a>(elf: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    if elf.get(..4)? != b"\x7fELF" {
        return None;
    }
    let wide = match elf.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little = *elf.get(5)? == 1;
    let uint = |at: usize, len: usize| -> Option<usize> {
        let bytes = elf.get(at..at.checked_add(len)?)?;
        let mut value: u64 = 0;
        for i in 0..len {
            let b = if little { bytes[len - 1 - i] } else { bytes[i] };
            value = (value << 8) | u64::from(b);
        }
        usize::try_from(value).ok()
    };
    // e_shoff, e_shentsize, e_shnum, e_shstrndx; sh_name, sh_offset, sh_size.
    let (shoff, entsize, num, strndx) = match wide {
        true => (
            uint(0x28, 8)?,
            uint(0x3a, 2)?,
            uint(0x3c, 2)?,
            uint(0x3e, 2)?,
        ),
        false => (
            uint(0x20, 4)?,
            uint(0x2e, 2)?,
            uint(0x30, 2)?,
            uint(0x32, 2)?,
        ),
    };
    let section = |i: usize| -> Option<(usize, &'a [u8])> {
        let at = shoff.checked_add(i.checked_mul(entsize)?)?;
        let (offset, size) = match wide {
            true => (uint(at + 0x18, 8)?, uint(at + 0x20, 8)?),
            false => (uint(at + 0x10, 4)?, uint(at + 0x14, 4)?),
        };
        Some((uint(at, 4)?, elf.get(offset..offset.checked_add(size)?)?))
    };
    let (_, names) = section(strndx)?;
    (0..num).find_map(|i| {
        let (at, data) = section(i)?;
        let rest = names.get(at..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        (&rest[..end] == name).then_some(data)
    })
}

/// A uvarint-prefixed string of bytes.
fn read_bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (mut len, mut shift, mut used) = (0usize, 0u32, 0usize);
    for &b in rest.iter().take(10) {
        used += 1;
        len |= usize::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let bytes = rest.get(used..used.checked_add(len)?)?;
    *rest = &rest[used + len..];
    Some(bytes)
}

/// `h1:<base64>` as the hex SHA-256 SPDX checksums take.
fn h1_hex(sum: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(sum.strip_prefix("h1:")?)
        .ok()?;
    (raw.len() == 32).then(|| hex::encode(raw))
}

impl BuildInfo {
    /// What every platform's build shares: settings that name a platform
    /// (`GOOS`, `GOARCH`, `GOAMD64`, …) left out, for an index's SBOM.
    pub fn common(&self) -> BuildInfo {
        let mut common = self.clone();
        common.settings.retain(|s| !s.starts_with("GO"));
        common
    }
}

/// The SPDX 2.3 document for the image `subject` (named `name`) whose
/// binary was built as `info` says.
pub fn spdx(name: &str, subject: &Digest, info: &BuildInfo) -> Value {
    let go_package = |id: &str, m: &ModuleInfo, purpose: &str| {
        let purl = format!("pkg:golang/{}@{}", m.path, m.version);
        let mut p = package(id, &m.path, &m.version, purpose, Some(purl));
        if !matches!(m.version.as_str(), "" | "(devel)") {
            p["downloadLocation"] = json!(format!(
                "https://proxy.golang.org/{}/@v/{}.zip",
                m.path, m.version
            ));
        }
        if let Some(sum) = &m.sum {
            p["comment"] = json!(format!("go.sum: {sum}"));
            if let Some(hex) = h1_hex(sum) {
                p["checksums"] = json!([{ "algorithm": "SHA256", "checksumValue": hex }]);
            }
        }
        p
    };
    let main = info.main.clone().unwrap_or(ModuleInfo {
        path: info.path.clone(),
        version: "(devel)".into(),
        sum: None,
    });
    let mut main_package = go_package("SPDXRef-Package-main", &main, "APPLICATION");
    main_package["sourceInfo"] = json!(format!(
        "built by kontain with {}: package {}; build settings: {}",
        info.go_version,
        info.path,
        info.settings.join(" ")
    ));
    let mut stdlib = package(
        "SPDXRef-Package-stdlib",
        "stdlib",
        &info.go_version,
        "LIBRARY",
        Some(format!("pkg:golang/stdlib@{}", info.go_version)),
    );
    stdlib["downloadLocation"] = json!("https://go.dev/dl/");
    let mut packages = vec![main_package, stdlib];
    let mut relationships = vec![
        relationship("SPDXRef-Image", "CONTAINS", "SPDXRef-Package-main"),
        relationship(
            "SPDXRef-Package-main",
            "DEPENDS_ON",
            "SPDXRef-Package-stdlib",
        ),
    ];
    for (n, dep) in info.deps.iter().enumerate() {
        let id = format!("SPDXRef-Package-dep-{n}");
        packages.push(go_package(&id, dep, "LIBRARY"));
        relationships.push(relationship("SPDXRef-Package-main", "DEPENDS_ON", &id));
    }
    crate::image::sbom::spdx("ko", name, subject, packages, relationships)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uvarint(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut n = n;
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn reads_inline_build_info_and_writes_spdx() {
        let modinfo = "path\texample.com/hello\nmod\texample.com/hello\tv1.0.0\t\ndep\texample.com/greeting\tv1.0.0\th1:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\nbuild\t-trimpath=true\nbuild\tGOARCH=amd64\n";
        // The sentinels are not UTF-8, as in real binaries.
        let mut wrapped = vec![0xf9_u8; 16];
        wrapped.extend(modinfo.as_bytes());
        wrapped.extend([0x82_u8; 16]);
        let mut section = MAGIC.to_vec();
        section.extend([8, INLINE]);
        section.resize(HEADER, 0);
        for s in [b"go1.19.8".as_slice(), &wrapped] {
            section.extend(uvarint(s.len()));
            section.extend(s);
        }
        let binary = elf64(&[(".rodata", &section[..40]), (".go.buildinfo", &section)]);
        let info = build_info(&binary).expect("build info");
        assert_eq!(info.go_version, "go1.19.8");
        assert_eq!(info.path, "example.com/hello");
        assert_eq!(info.deps.len(), 1);
        assert_eq!(info.settings, ["-trimpath=true", "GOARCH=amd64"]);
        let subject = Digest::sha256(b"image");
        let doc = spdx("ko/example.com/hello", &subject, &info);
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        let dep = &doc["packages"][3];
        assert_eq!(doc["packages"][0]["SPDXID"], "SPDXRef-Image");
        assert_eq!(
            (dep["name"].as_str(), dep["versionInfo"].as_str()),
            (Some("example.com/greeting"), Some("v1.0.0"))
        );
        assert_eq!(
            dep["checksums"][0]["checksumValue"].as_str().map(str::len),
            Some(64)
        );
        assert_eq!(
            doc,
            spdx("ko/example.com/hello", &subject, &info),
            "deterministic"
        );
        assert_eq!(build_info(b"no build info here"), None);
        // The same bytes anywhere but in the section are not build info.
        let forged = elf64(&[(".noptrdata", &section)]);
        assert_eq!(build_info(&forged), None);
        // Cut anywhere, or with any byte changed, it never panics.
        for n in 0..binary.len() {
            let _ = build_info(&binary[..n]);
            let mut bent = binary.clone();
            bent[n] ^= 0xff;
            let _ = build_info(&bent);
        }
    }

    /// A little-endian ELF64 file holding `sections` (and their names).
    fn elf64(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut data = Vec::new();
        let mut headers = vec![[0u64; 3]]; // the null section: name, offset, size
        for (name, bytes) in sections {
            headers.push([names.len() as u64, 0, bytes.len() as u64]);
            names.extend(name.as_bytes());
            names.push(0);
            data.push(*bytes);
        }
        let at = names.len() as u64;
        names.extend(b".shstrtab\0");
        headers.push([at, 0, names.len() as u64]);
        data.push(&names);
        let mut out = vec![0u8; 64];
        out[..6].copy_from_slice(b"\x7fELF\x02\x01");
        for (i, bytes) in data.iter().enumerate() {
            headers[i + 1][1] = out.len() as u64;
            out.extend(*bytes);
        }
        let shoff = out.len() as u64;
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&(headers.len() as u16).to_le_bytes());
        out[0x3e..0x40].copy_from_slice(&((headers.len() - 1) as u16).to_le_bytes());
        for [name, offset, size] in headers {
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&(name as u32).to_le_bytes());
            header[0x18..0x20].copy_from_slice(&offset.to_le_bytes());
            header[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            out.extend(header);
        }
        out
    }
}
