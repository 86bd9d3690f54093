//! `GET /v1/models` with `[models]` aliases: the upstream's list, and each alias the clients
//! may send added as a model object (`"owned_by": "oa-bypass"`), so `client.models.list()`
//! shows them. The upstream's entries pass as they came: the objects are written into the
//! `data` array's text, nothing is re-serialised.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A list longer than this is not held to be edited: it passes as it comes, without the
/// aliases (the upstream's own lists are a few tens of KiB).
const HELD_AT_MOST: usize = 4 << 20;

/// Holds a models list until it ends, then gives it with the aliases in.
pub(crate) struct AliasedList {
    aliases: Vec<String>,
    held: BytesMut,
    /// Too long to hold: what comes passes on.
    passing: bool,
}

impl AliasedList {
    pub(crate) fn new(aliases: Vec<String>) -> AliasedList {
        AliasedList {
            aliases,
            held: BytesMut::new(),
            passing: false,
        }
    }

    /// A chunk of the list: held (nothing goes on yet), or, past [`HELD_AT_MOST`], everything
    /// held so far.
    pub(crate) fn pass(&mut self, chunk: Bytes) -> Bytes {
        if self.passing {
            return chunk;
        }
        self.held.extend_from_slice(&chunk);
        if self.held.len() > HELD_AT_MOST {
            self.passing = true;
            return self.held.split().freeze();
        }
        Bytes::new()
    }

    /// The list ended: the whole of it, with the aliases it lacks (or as it came, when it is
    /// not a list object).
    pub(crate) fn finish(&mut self) -> Bytes {
        let held = self.held.split().freeze();
        if self.passing {
            return held;
        }
        with_aliases(&held, &self.aliases).unwrap_or(held)
    }
}

/// `list` (`{"object":"list","data":[…]}`) with a model object for each of `aliases` that
/// its `data` does not already name, written first in the array.
fn with_aliases(list: &[u8], aliases: &[String]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct List<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
    }
    #[derive(Deserialize)]
    struct Entry {
        id: Option<String>,
    }
    let data = serde_json::from_slice::<List>(list).ok()?.data;
    let entries: Vec<Entry> = serde_json::from_str(data.get()).ok()?;
    let mut objects = Vec::new();
    for alias in aliases {
        if entries
            .iter()
            .any(|entry| entry.id.as_deref() == Some(alias))
        {
            continue;
        }
        let object = serde_json::json!({
            "id": alias,
            "object": "model",
            "created": 0,
            "owned_by": "oa-bypass",
        });
        objects.push(object.to_string());
    }
    if objects.is_empty() {
        return None;
    }
    let open = (data.get().as_ptr() as usize).checked_sub(list.as_ptr() as usize)? + 1;
    let mut out =
        BytesMut::with_capacity(list.len() + objects.iter().map(String::len).sum::<usize>() + 8);
    out.extend_from_slice(&list[..open]);
    out.extend_from_slice(objects.join(",").as_bytes());
    if !entries.is_empty() {
        out.extend_from_slice(b",");
    }
    out.extend_from_slice(&list[open..]);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(list: &[u8], aliases: &[&str]) -> serde_json::Value {
        let aliases: Vec<String> = aliases.iter().map(|a| (*a).to_owned()).collect();
        let mut edit = AliasedList::new(aliases);
        for chunk in list.chunks(5) {
            assert!(edit.pass(Bytes::copy_from_slice(chunk)).is_empty());
        }
        serde_json::from_slice(&edit.finish()).unwrap()
    }

    #[test]
    fn aliases_join_the_upstreams_entries_which_pass_unchanged() {
        let list = br#"{"object":"list","data":[{"id":"gpt-4o","object":"model","created":1715367049,"owned_by":"system"}]}"#;
        let json = listed(list, &["fast", "gpt-4o"]);
        let ids: Vec<&str> = (json["data"].as_array().unwrap().iter())
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["fast", "gpt-4o"],
            "an alias the upstream lists is not added twice"
        );
        assert_eq!(json["data"][0]["owned_by"], "oa-bypass");
        assert_eq!(json["data"][1]["created"], 1_715_367_049);
        let empty = listed(br#"{"object":"list","data":[]}"#, &["fast"]);
        assert_eq!(empty["data"][0]["id"], "fast");
        // Not a list: as it came.
        let mut edit = AliasedList::new(vec!["fast".into()]);
        edit.pass(Bytes::from_static(b"{\"error\":{}}"));
        assert_eq!(&edit.finish()[..], b"{\"error\":{}}");
    }
}
