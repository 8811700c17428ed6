//! `sources`: the addresses of devices that send as an account without a login. Never every
//! address, and never one address for two accounts.

use std::net::IpAddr;
use std::sync::Arc;

use super::{err, Account, ConfigError};

/// `sources`: addresses (`10.1.2.3`) and networks (`192.168.10.0/24`); never everything.
pub(super) fn parse(what: &str, written: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let mut out = Vec::new();
    for text in written {
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                ConfigError(format!(
                    "{what}: sources entry \"{text}\" is neither an address (10.1.2.3) nor a network \
                     (192.168.10.0/24)"
                ))
            })?;
        // Peers are matched as IPv4 when they come over IPv4-mapped IPv6: so are the entries.
        let net = match net {
            ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                    .map(ipnet::IpNet::V4)
                    .unwrap_or(net),
                None => net,
            },
            other => other,
        };
        // Devices sit in a site's own networks; anything wider than a /8 (IPv4) or a /32 (IPv6,
        // a provider's whole allocation) lets strangers send as the account without a password.
        let widest = if net.addr().is_ipv4() { 8 } else { 32 };
        if net.prefix_len() < widest {
            let all = if net.prefix_len() == 0 {
                "every address"
            } else {
                "far too wide"
            };
            return err(format!(
                "{what}: sources entry \"{text}\" is {all}: anyone there could send as the account \
                 without a password (an open relay); list the devices' addresses or networks (at \
                 most a /{widest})"
            ));
        }
        out.push(net.trunc());
    }
    Ok(out)
}

/// Every address maps to at most one account: two accounts whose `sources` overlap are refused.
pub(super) fn overlapping(accounts: &[Arc<Account>]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in accounts.iter().enumerate() {
        for b in &accounts[i + 1..] {
            for x in &a.sources {
                for y in &b.sources {
                    if x.contains(&y.network()) || y.contains(&x.network()) {
                        out.push(format!(
                            "account `{}` source {x} and account `{}` source {y} overlap: an address \
                             must belong to one account only",
                            a.name, b.name
                        ));
                    }
                }
            }
        }
    }
    out
}
