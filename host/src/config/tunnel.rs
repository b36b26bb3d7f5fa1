//! Creating a tunnel: a fresh token and the `[[tunnel]]` block that holds only its hash.

use super::HostPattern;
use crate::secret::Secret;

/// A newly created tunnel.
#[derive(Debug)]
pub struct NewTunnel {
    /// The token, for the connector; shown once.
    pub token: Secret,
    /// The `[[tunnel]]` block for the edge's file.
    pub edge_block: String,
}

/// Creates tunnel `id` serving `hostnames`, with a random 256-bit token.
pub fn new_tunnel(id: &str, hostnames: &[String]) -> Result<NewTunnel, String> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "invalid tunnel name {id:?}: use letters, digits, '-' and '_'"
        ));
    }
    if hostnames.is_empty() {
        return Err("give at least one --hostname".into());
    }
    let patterns = hostnames
        .iter()
        .map(|h| HostPattern::try_from(h.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let token = Secret::new(hex::encode(rand::random::<[u8; 32]>()));
    let hosts: Vec<String> = patterns
        .iter()
        .map(|p| format!("{:?}", p.to_string()))
        .collect();
    let edge_block = format!(
        "[[tunnel]]\nid = {id:?}\ntoken-sha256 = \"{}\"\nhostnames = [{}]\n",
        hex::encode(token.sha256()),
        hosts.join(", ")
    );
    Ok(NewTunnel { token, edge_block })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_holds_only_the_hash() {
        let t = new_tunnel(
            "app",
            &["App.Example.com".into(), "*.app.example.com".into()],
        )
        .unwrap();
        assert_eq!(t.token.expose().len(), 64);
        assert!(!t.edge_block.contains(t.token.expose()));
        assert!(t.edge_block.contains(&hex::encode(t.token.sha256())));
        assert!(t
            .edge_block
            .contains(r#"hostnames = ["app.example.com", "*.app.example.com"]"#));
        assert_ne!(
            new_tunnel("app", &["a.test".into()]).unwrap().token,
            t.token
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(new_tunnel("bad name", &["a.test".into()]).is_err());
        assert!(new_tunnel("app", &[]).is_err());
        assert!(new_tunnel("app", &["not a host".into()]).is_err());
    }
}
