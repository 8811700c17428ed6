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
        if net.prefix_len() == 0 {
            return err(format!(
                "{what}: sources entry \"{text}\" is every address: anyone could send as the account \
                 without a password (an open relay); list the devices' addresses or networks"
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
