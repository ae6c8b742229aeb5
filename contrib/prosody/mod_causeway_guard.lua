-- mod_causeway_guard: refuses, on a Causeway XMPP component's host, every
-- stanza that Prosody would write to the component larger than the
-- component takes (Causeway's xmpp.max_stanza_bytes), so that no user can
-- close the component's stream for everyone (docs/xmpp.md, "Stanza size").
--
-- Prosody writes each namespaced attribute with a namespace declaration of
-- its own (util/stanza.lua) and escapes ' " < > & as entities of up to six
-- bytes, so what it writes can be a hundred times larger than what it read.
-- This module adds up, before mod_component forwards the stanza, an upper
-- bound of the bytes Prosody's serializer writes for it, and refuses the
-- stanza when that is over causeway_guard_max_bytes.
--
--   plugin_paths = { "/etc/prosody/causeway" }        -- the directory of this file
--   Component "gk.example.org"
--       component_secret = "..."
--       modules_enabled = { "causeway_guard" }
--       causeway_guard_max_bytes = 1048576            -- xmpp.max_stanza_bytes

local st = require "util.stanza";

local max_bytes = module:get_option_number("causeway_guard_max_bytes", 1048576);

local s_find, s_gsub, s_match = string.find, string.gsub, string.match;

-- Bytes of s once escaped: each of ' " < > & at most six.
local function escaped(s)
	local _, n = s_gsub(s, "['&<>\"]", "");
	return #s + 5 * n;
end

-- An upper bound of #tostring(t), as util.stanza's _dostring writes it;
-- parentns as _dostring is given it. top: t is the stanza, whose xmlns
-- mod_component removes before it writes it, so that its children are
-- written as if their parent had none.
local function size(t, parentns, top)
	local n = #"<" + #t.name;
	local nsid = 0;
	for k, v in pairs(t.attr) do
		if s_find(k, "\1", 1, true) then
			local ns, attrk = s_match(k, "^([^\1]*)\1?(.*)$");
			nsid = nsid + 1;
			local id = #tostring(nsid); -- " xmlns:nsN='ns' nsN:attr='v'"
			n = n + #" xmlns:ns" + id + #"='" + escaped(ns) + #"' ns" + id + #":" + #attrk + #"='" + escaped(v) + #"'";
		elseif not (k == "xmlns" and (top or v == parentns)) then
			n = n + #" " + #k + #"='" + escaped(v) + #"'";
		end
	end
	if #t == 0 then
		return n + #"/>";
	end
	n = n + #">" + #"</" + #t.name + #">";
	for i = 1, #t do
		local child = t[i];
		if child.name then
			n = n + size(child, (not top) and t.attr.xmlns or nil);
		else
			n = n + escaped(child);
		end
	end
	return n;
end

local function guard(event)
	local stanza = event.stanza;
	local bytes = size(stanza, nil, true);
	if bytes <= max_bytes then
		return; -- on to mod_component
	end
	module:log("warn", "Refused a %s from %s to %s: up to %d bytes as written, more than causeway_guard_max_bytes (%d)",
		stanza.name, tostring(stanza.attr.from), tostring(stanza.attr.to), bytes, max_bytes);
	local stanza_type = stanza.attr.type;
	if stanza_type ~= "error" and not (stanza.name == "iq" and stanza_type == "result") then
		module:send(st.error_reply(stanza, "modify", "policy-violation",
			"The stanza is too large for the gateway (more than "..max_bytes.." bytes as the server writes it)", module.host));
	end
	return true;
end

-- Before mod_component's handlers (priority -1).
for _, name in ipairs({ "message", "presence", "iq" }) do
	for _, kind in ipairs({ "bare", "full", "host" }) do
		module:hook(name.."/"..kind, guard, 100);
	end
end
