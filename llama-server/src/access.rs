//! Which `Host` and `Origin` headers the server answers: the guard against DNS rebinding (a web
//! page whose domain is re-pointed at 127.0.0.1 reaches a local server with its own name in
//! `Host`) and against other sites' pages posting to it.
//!
//! Allowed by default: `localhost` and its subdomains, loopback addresses, the address the
//! server is bound to (any IP address when it is bound to every interface: an address cannot be
//! re-pointed by DNS), plus the names given with `--allow-host` (`.example.com` allows the
//! domain and its subdomains; `*` allows any). An `Origin` must name an allowed host or be
//! one of the CORS origins.

use std::net::IpAddr;

/// The hosts a server answers.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    bound: IpAddr,
    names: Vec<String>,
    any: bool,
}

impl HostPolicy {
    /// The default policy of a server bound to `bound`, with `extra` names allowed.
    pub fn new(bound: IpAddr, extra: &[String]) -> Result<HostPolicy, String> {
        let mut names = vec![];
        let mut any = false;
        for n in extra {
            let n = n.trim().trim_end_matches('.').to_ascii_lowercase();
            if n == "*" {
                any = true;
            } else if n.is_empty()
                || !n.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']')
                })
            {
                return Err(format!("--allow-host {n:?} is not a host name"));
            } else {
                names.push(n);
            }
        }
        Ok(HostPolicy { bound, names, any })
    }

    /// Whether a `Host` header value (a name or address, with or without a port) is allowed.
    pub fn allows_host(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let name = strip_port(host.trim())
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if name.is_empty() {
            return false;
        }
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return ip.is_loopback()
                || ip == self.bound
                || self.bound.is_unspecified()
                || self
                    .names
                    .iter()
                    .any(|n| n.parse::<IpAddr>().ok() == Some(ip));
        }
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        self.names.iter().any(|n| {
            if let Some(domain) = n.strip_prefix('.') {
                name == domain || name.ends_with(n.as_str())
            } else {
                &name == n
            }
        })
    }

    /// Whether an `Origin` header value may call the API: an allowed host, or one of `cors`.
    pub fn allows_origin(&self, origin: &str, cors: &[String]) -> bool {
        if cors
            .iter()
            .any(|c| c == "*" || c.eq_ignore_ascii_case(origin))
        {
            return true;
        }
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false;
        };
        if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") || rest.contains('/') {
            return false;
        }
        self.allows_host(rest)
    }
}

/// `host:port` -> `host`; `[v6]:port` -> `[v6]`; a bare IPv6 address stays whole.
fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return match h.find(']') {
            Some(i) => &h[..=i],
            None => h,
        };
    }
    match h.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_and_the_bound_address_pass_rebinding_names_do_not() {
        let p = HostPolicy::new("127.0.0.1".parse().unwrap(), &[]).unwrap();
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:80",
            "::1",
            "127.0.0.2",
        ] {
            assert!(p.allows_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.5:8080",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!p.allows_host(bad), "{bad}");
        }
        let p = HostPolicy::new(
            "0.0.0.0".parse().unwrap(),
            &["my.box".into(), ".lan".into()],
        )
        .unwrap();
        for ok in ["10.0.0.5:8080", "my.box", "MY.BOX.:80", "pc.lan", "lan"] {
            assert!(p.allows_host(ok), "{ok}");
        }
        assert!(!p.allows_host("other.box"));
        assert!(HostPolicy::new("127.0.0.1".parse().unwrap(), &["*".into()])
            .unwrap()
            .allows_host("anything"));
        assert!(HostPolicy::new("127.0.0.1".parse().unwrap(), &["a b".into()]).is_err());
    }

    #[test]
    fn origins_follow_the_hosts_and_the_cors_list() {
        let p = HostPolicy::new("127.0.0.1".parse().unwrap(), &[]).unwrap();
        assert!(p.allows_origin("http://127.0.0.1:8080", &[]));
        assert!(p.allows_origin("http://localhost:3000", &[]));
        assert!(!p.allows_origin("http://evil.example", &[]));
        assert!(!p.allows_origin("null", &[]));
        assert!(p.allows_origin("http://evil.example", &["http://evil.example".into()]));
        assert!(p.allows_origin("null", &["*".into()]));
        assert!(!p.allows_origin("file://", &[]));
    }
}
