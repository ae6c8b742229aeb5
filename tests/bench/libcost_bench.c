/* What the libraries Causeway must use cost per operation on this machine,
 * measured apart from the daemon: the floors under the per-message targets
 * of spec/quality.md (docs/performance.md, "Sixth session").
 *
 *   - Ed25519 verification (OpenSSL): with a context set up per request (as
 *     the daemon verifies), and with one context reused (as `openssl speed`
 *     measures the rate the single-submit target is a ratio of);
 *   - jansson: parsing a stored message's content, and a whole event as a
 *     peer sends it;
 *   - libstrophe: building, serialising and freeing the usual outbound chat
 *     message (body, origin-id, receipt request, markable, chat state).
 *
 * Prints microseconds per operation, and the share of the XMPP target
 * (5 us of Causeway CPU per message) that jansson and libstrophe take
 * before anything else is done.  A command, not a test. */
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strophe.h>
#include <time.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static xmpp_stanza_t *child(xmpp_ctx_t *ctx, xmpp_stanza_t *parent, const char *name, const char *ns)
{
	xmpp_stanza_t *e = xmpp_stanza_new(ctx);
	xmpp_stanza_set_name(e, name);
	if (ns)
		xmpp_stanza_set_ns(e, ns);
	xmpp_stanza_add_child_ex(parent, e, 0);
	return e;
}

static const char CONTENT[] = "{\"parts\":[{\"body\":\"message 12345: see you at the station at 8?\","
			      "\"type\":\"text/plain\"}]}";
static const char EVENT[] = "{\"accepted_ts\":1700000000000,\"content\":{\"parts\":[{\"body\":\"message 12345: see "
			    "you at the station at 8?\",\"type\":\"text/plain\"}]},\"id\":\"msg_A1b2C3d4E5f6G7h8I9j0Kq\","
			    "\"room\":\"mimi://wa.example/r/abc123\",\"room_id\":\"r_A1b2C3d4E5f6G7h8I9j0Kq\","
			    "\"sender\":\"mimi://wa.example/u/wally\",\"ts\":1700000000000,\"type\":\"message\"}";

int main(int argc, char **argv)
{
	int scale = argc > 1 && strcmp(argv[1], "--quick") == 0 ? 10 : 1;
	/* Ed25519 */
	EVP_PKEY *key = NULL;
	EVP_PKEY_CTX *kc = EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, NULL);
	if (!kc || EVP_PKEY_keygen_init(kc) != 1 || EVP_PKEY_keygen(kc, &key) != 1)
		return 1;
	unsigned char pub[32], msg[300], sig[64];
	size_t plen = sizeof(pub), slen = sizeof(sig);
	EVP_PKEY_get_raw_public_key(key, pub, &plen);
	EVP_PKEY *pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pub, 32);
	for (size_t i = 0; i < sizeof(msg); i++)
		msg[i] = (unsigned char)i;
	EVP_MD_CTX *sc = EVP_MD_CTX_new();
	if (!pk || !sc || EVP_DigestSignInit(sc, NULL, NULL, NULL, key) != 1 ||
	    EVP_DigestSign(sc, sig, &slen, msg, sizeof(msg)) != 1)
		return 1;
	int nv = 20000 / scale, ok = 0;
	double t0 = now();
	for (int i = 0; i < nv; i++) {
		EVP_MD_CTX *c = EVP_MD_CTX_new();
		EVP_DigestVerifyInit(c, NULL, NULL, NULL, pk);
		ok += EVP_DigestVerify(c, sig, 64, msg, sizeof(msg)) == 1;
		EVP_MD_CTX_free(c);
	}
	double t1 = now();
	EVP_MD_CTX *reused = EVP_MD_CTX_new();
	EVP_DigestVerifyInit(reused, NULL, NULL, NULL, pk);
	for (int i = 0; i < nv; i++)
		ok += EVP_DigestVerify(reused, sig, 64, msg, sizeof(msg)) == 1;
	double t2 = now();
	if (ok != 2 * nv)
		return 1;

	/* jansson */
	int nj = 300000 / scale;
	size_t sink = 0;
	double j0 = now();
	for (int i = 0; i < nj; i++) {
		json_t *j = json_loads(CONTENT, 0, NULL);
		sink += json_object_size(j);
		json_decref(j);
	}
	double j1 = now();
	for (int i = 0; i < nj; i++) {
		json_t *j = json_loads(EVENT, 0, NULL);
		sink += json_object_size(j);
		json_decref(j);
	}
	double j2 = now();

	/* libstrophe */
	xmpp_initialize();
	xmpp_ctx_t *ctx = xmpp_ctx_new(NULL, NULL);
	int ns = 200000 / scale;
	double s0 = now();
	for (int i = 0; i < ns; i++) {
		xmpp_stanza_t *m = xmpp_message_new(ctx, "chat", "alice@example.org", "msg_A1b2C3d4E5f6G7h8I9j0Kq");
		xmpp_stanza_set_from(m, "wally@wa.example.org");
		xmpp_stanza_t *b = child(ctx, m, "body", NULL), *t = xmpp_stanza_new(ctx);
		xmpp_stanza_set_text(t, "message 12345: see you at the station at 8?");
		xmpp_stanza_add_child_ex(b, t, 0);
		xmpp_stanza_set_attribute(child(ctx, m, "origin-id", "urn:xmpp:sid:0"), "id", "msg_A1b2C3d4E5f6G7h8I9j0Kq");
		child(ctx, m, "request", "urn:xmpp:receipts");
		child(ctx, m, "markable", "urn:xmpp:chat-markers:0");
		child(ctx, m, "active", "http://jabber.org/protocol/chatstates");
		char *text;
		size_t len;
		if (xmpp_stanza_to_text(m, &text, &len) == XMPP_EOK) {
			sink += len;
			xmpp_free(ctx, text);
		}
		xmpp_stanza_release(m);
	}
	double s1 = now();
	xmpp_ctx_free(ctx);
	xmpp_shutdown();

	double v_each = (t1 - t0) / nv * 1e6, v_reused = (t2 - t1) / nv * 1e6;
	double content = (j1 - j0) / nj * 1e6, event = (j2 - j1) / nj * 1e6, stanza = (s1 - s0) / ns * 1e6;
	if (sink == 1) /* never: keeps the work from being optimised away */
		puts("");
	printf("library costs on this machine, one core\n");
	printf("  Ed25519 verify, a context per request: %.1f us; one context reused: %.1f us (ratio %.3f)\n", v_each,
	       v_reused, v_reused / v_each);
	printf("    single-submit target (0.8 of the verify rate): at most %.1f us per request in all\n",
	       v_reused / 0.8);
	printf("  jansson, a stored message's content: %.2f us; a whole event as a peer sends it: %.2f us\n", content,
	       event);
	printf("  libstrophe, an outbound chat message built, serialised and freed: %.2f us\n", stanza);
	printf("    content parse + stanza: %.2f us = %.2f of the XMPP target (5 us of Causeway CPU per message)\n",
	       content + stanza, (content + stanza) / 5.0);
	return 0;
}
