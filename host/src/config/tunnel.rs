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

/// A fresh random 256-bit token.
fn fresh_token() -> Secret {
    Secret::new(hex::encode(rand::random::<[u8; 32]>()))
}

/// The `[[tunnel]]` block of `id` accepting the tokens hashed in `hashes`.
fn edge_block(id: &str, hashes: &[[u8; 32]], hostnames: &[HostPattern], comment: &str) -> String {
    let hosts: Vec<String> = hostnames
        .iter()
        .map(|p| format!("{:?}", p.to_string()))
        .collect();
    let token_line = match hashes {
        [one] => format!("\"{}\"", hex::encode(one)),
        many => {
            let listed: Vec<String> = many
                .iter()
                .map(|h| format!("\"{}\"", hex::encode(h)))
                .collect();
            format!("[{}]", listed.join(", "))
        }
    };
    format!(
        "[[tunnel]]\nid = {id:?}\n{comment}token-sha256 = {token_line}\nhostnames = [{}]\n",
        hosts.join(", ")
    )
}

/// Starts a token rotation for `tunnel`: a fresh token, and the tunnel's block accepting the
/// tokens it accepts now *and* the new one, so that connectors can move over one by one.
pub fn rotate_tunnel(tunnel: &super::TunnelConfig) -> Result<NewTunnel, String> {
    if tunnel.token_hashes.len() >= super::edge::MAX_TOKENS_PER_TUNNEL {
        return Err(format!(
            "tunnel {:?} already accepts {} tokens: finish the previous rotation first",
            tunnel.id,
            tunnel.token_hashes.len()
        ));
    }
    let token = fresh_token();
    let mut hashes = tunnel.token_hashes.clone();
    hashes.push(token.sha256());
    let comment = "# The current token(s), then the new one. Once every connector runs the new\n\
                   # token (the edge's /status shows which token each connection used), keep\n\
                   # only the last hash and reload the edge again.\n";
    Ok(NewTunnel {
        edge_block: edge_block(&tunnel.id, &hashes, &tunnel.hostnames, comment),
        token,
    })
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
    let token = fresh_token();
    let edge_block = edge_block(id, &[token.sha256()], &patterns, "");
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
    fn rotation_keeps_the_current_hashes_and_adds_the_new_one() {
        let t = new_tunnel("app", &["app.example.com".into()]).unwrap();
        let current = super::super::TunnelConfig {
            id: "app".into(),
            token_hashes: vec![t.token.sha256()],
            hostnames: vec![HostPattern::try_from("app.example.com").unwrap()],
            max_concurrent_requests: 1,
            max_connections: 1,
            ports: Vec::new(),
        };
        let r = rotate_tunnel(&current).unwrap();
        assert_ne!(r.token, t.token);
        let expected = format!(
            "token-sha256 = [\"{}\", \"{}\"]",
            hex::encode(t.token.sha256()),
            hex::encode(r.token.sha256())
        );
        assert!(r.edge_block.contains(&expected), "{}", r.edge_block);
        assert!(!r.edge_block.contains(r.token.expose()));
        // The printed block is valid edge TOML (the tunnel part of it).
        let block: toml::Table = toml::from_str(&r.edge_block).unwrap();
        assert_eq!(
            block["tunnel"][0]["token-sha256"].as_array().unwrap().len(),
            2
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(new_tunnel("bad name", &["a.test".into()]).is_err());
        assert!(new_tunnel("app", &[]).is_err());
        assert!(new_tunnel("app", &["not a host".into()]).is_err());
    }
}
