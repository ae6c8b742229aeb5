/* The XMPP adapter's configuration check (xmpp.components, xmpp.domain,
 * xmpp.secret), apart from the adapter: cfg_load calls it (so
 * --check-config, the start and a reload make it), xa_new reads the
 * components through it, and the configuration's fuzz target links it
 * without the adapter. */
#include "config.h"
#include "xmpp_int.h"
#include "peer/event.h"
#include <stdlib.h>
#include <string.h>

cw_err xa_components_parse(const char *list, xa_component_fn each, void *arg, cw_errmsg *e)
{
	char *copy = strdup(list ? list : ""), *save = NULL;
	if (!copy)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	cw_err rc = CW_OK;
	for (char *tok = strtok_r(copy, " ,\t", &save); tok && !rc; tok = strtok_r(NULL, " ,\t", &save)) {
		char *eq = strchr(tok, '=');
		if (!eq) {
			rc = cw_fail(e, CW_EINVAL, "xmpp.components: \"%.100s\" is not DOMAIN=PEER", tok);
			break;
		}
		*eq = '\0';
		const char *domain = tok, *peer = eq + 1;
		char l[8], d[XJ_PART_MAX + 1], r[8];
		if (!xj_split(domain, l, sizeof(l), d, sizeof(d), r, sizeof(r)) || l[0] || r[0])
			rc = cw_fail(e, CW_EINVAL, "xmpp.components: \"%.100s\" is not a domain", domain);
		/* The peer's own rule (POST /admin/v1/peers): until the
		 * twenty-fourth session a looser copy of it here took names no
		 * peer can have (gk.example, -gk), and the component never
		 * matched one. */
		else if (!peer_name_valid(peer))
			rc = cw_fail(e, CW_EINVAL,
				     "xmpp.components: \"%.100s\" is not a peer name (1 to 32 of a-z, 0-9, '_' and '-', "
				     "starting with a letter or digit, as POST /admin/v1/peers takes it)",
				     peer);
		else if (each)
			rc = each(arg, d, peer, e);
	}
	free(copy);
	return rc;
}

/* What xa_config_check takes besides xa_components_parse's syntax: each
 * domain and peer once, none the users' own domain, at most
 * XMPP_COMPONENTS_MAX; then its caller's each. */
struct components_seen {
	const char *local; /* NULL: not a domain (xa_config_check says so after the list) */
	int n;
	char domain[XMPP_COMPONENTS_MAX][XJ_PART_MAX + 1];
	char peer[XMPP_COMPONENTS_MAX][XMPP_PEER_MAX + 1];
	xa_component_fn each;
	void *arg;
};

static cw_err component_seen(void *arg, const char *d, const char *peer, cw_errmsg *e)
{
	struct components_seen *s = arg;
	if (s->local && strcmp(d, s->local) == 0)
		return cw_fail(e, CW_EINVAL, "xmpp.components: %s is the users' own domain", d);
	for (int i = 0; i < s->n; i++)
		if (strcmp(s->domain[i], d) == 0 || strcmp(s->peer[i], peer) == 0)
			return cw_fail(e, CW_EINVAL, "xmpp.components: %s or %s named twice", d, peer);
	if (s->n == XMPP_COMPONENTS_MAX)
		return cw_fail(e, CW_EINVAL, "xmpp.components: at most %d components", XMPP_COMPONENTS_MAX);
	snprintf(s->domain[s->n], sizeof(s->domain[s->n]), "%s", d);
	snprintf(s->peer[s->n], sizeof(s->peer[s->n]), "%s", peer);
	s->n++;
	return s->each ? s->each(s->arg, d, peer, e) : CW_OK;
}

cw_err xa_config_check(const struct cw_config *cfg, char *local, size_t local_len, xa_component_fn each, void *arg,
		       cw_errmsg *e)
{
	if (!cfg->xmpp_components || !*cfg->xmpp_components)
		return CW_OK;
	struct components_seen *s = calloc(1, sizeof(*s));
	if (!s)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	s->each = each;
	s->arg = arg;
	const char *dom = cfg->xmpp_domain && *cfg->xmpp_domain ? cfg->xmpp_domain : cfg->domain ? cfg->domain : "";
	char l[8], d[XJ_PART_MAX + 1], r[8];
	if (*dom && xj_split(dom, l, sizeof(l), d, sizeof(d), r, sizeof(r)) && !l[0] && !r[0])
		s->local = d;
	/* The list's own errors first: they say more than a missing secret. */
	cw_err rc = xa_components_parse(cfg->xmpp_components, component_seen, s, e);
	if (!rc && !s->local)
		rc = cw_fail(e, CW_EINVAL, "xmpp.domain (or server.domain) must be the XMPP domain of this provider's users");
	else if (!rc && (!cfg->xmpp_secret || !*cfg->xmpp_secret))
		rc = cw_fail(e, CW_EINVAL, "xmpp.secret is not set (the component secret of the XMPP server)");
	else if (!rc && s->n == 0)
		rc = cw_fail(e, CW_EINVAL, "xmpp.components names no component");
	/* As the Matrix tokens (cfg_matrix_tokens_check): copied with the
	 * quotes of Prosody's or ejabberd's configuration, it is not the
	 * server's secret, and every component was refused its handshake,
	 * trying again for ever (until the forty-first session). */
	size_t sn = !rc ? strlen(cfg->xmpp_secret) : 0;
	if (sn >= 2 && (cfg->xmpp_secret[0] == '"' || cfg->xmpp_secret[0] == '\'') &&
	    cfg->xmpp_secret[sn - 1] == cfg->xmpp_secret[0])
		rc = cw_fail(e, CW_EINVAL, "xmpp.secret is wrapped in quotes, which would be part of the secret: write it "
			     "without them (a value is taken as written, to the end of the line)");
	if (!rc && local)
		snprintf(local, local_len, "%s", d);
	free(s);
	return rc;
}
