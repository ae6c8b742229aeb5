/* libFuzzer target: what a peer sends the neutral API before anything is
 * stored: an event body (event_parse), a batch body (batch_parse) and the
 * Signature-Input / Signature fields with the request's headers
 * (httpsig_verify, RFC 9421), chosen by the first byte; the first branch
 * also reads the body as a mimi:// URI and as a media token (GET
 * /v1/media/{token}).  Properties: nothing crashes, overflows or leaks, no
 * forged signature or token verifies (the keys are random, so a CW_OK from
 * httpsig_verify or a token that opens is a finding), and a URI that parses formats
 * back to exactly its text (the parser takes only the canonical spelling). */
#include "config.h"
#include "peer/event.h"
#include "peer/httpsig.h"
#include "media.h"

#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static EVP_PKEY *key;
static const char *fields[4]; /* content-digest, content-type, idempotency-key, authorization */

static EVP_PKEY *key_for(void *ctx, const char *keyid)
{
	(void)ctx;
	(void)keyid;
	return key;
}

static const char *header(void *ctx, const char *name)
{
	(void)ctx;
	if (!strcmp(name, "content-digest"))
		return fields[0];
	if (!strcmp(name, "content-type"))
		return fields[1];
	if (!strcmp(name, "idempotency-key"))
		return fields[2];
	if (!strcmp(name, "authorization"))
		return fields[3];
	return NULL;
}

/* The next line of the input (up to '\n'), NUL-terminated in place. */
static char *line(char **p)
{
	char *s = *p;
	if (!s)
		return NULL;
	char *nl = strchr(s, '\n');
	if (nl) {
		*nl = '\0';
		*p = nl + 1;
	} else {
		*p = NULL;
	}
	return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	if (!key) {
		EVP_PKEY_CTX *kc = EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, NULL);
		if (!kc || EVP_PKEY_keygen_init(kc) <= 0 || EVP_PKEY_keygen(kc, &key) <= 0)
			abort();
		EVP_PKEY_CTX_free(kc);
	}
	struct event_limits lim = event_limits_default();
	struct event_error err;
	const char *body = (const char *)data + 1;
	size_t len = size - 1;
	if (data[0] < 85) {
		struct event ev;
		if (event_parse(body, len, &lim, data[0] & 3, &ev, &err) == CW_OK) /* EVENT_REQUIRE_ROOM, _SENDER */
			event_free(&ev);
		char uri[MIMI_URI_MAX + 2], back[MIMI_URI_MAX + 1];
		struct mimi_uri u;
		cw_errmsg e;
		if (len < sizeof(uri)) {
			memcpy(uri, body, len);
			uri[len] = '\0';
			if (mimi_uri_parse(uri, &u, &e) == CW_OK &&
			    (mimi_uri_format(&u, back, sizeof(back), &e) != CW_OK || strcmp(back, uri) != 0))
				abort(); /* not canonical, or not reversible */
			static unsigned char mkey[32];
			static bool mkey_set;
			if (!mkey_set && cw_random(mkey, sizeof(mkey)) == CW_OK)
				mkey_set = true;
			char source[256];
			if (media_token_open(mkey, "gk", uri, source, sizeof(source)))
				abort(); /* a token made without the key opened */
		}
	} else if (data[0] < 170) {
		struct batch b;
		if (batch_parse(body, len, &lim, data[0] & 2 ? EVENT_REQUIRE_SENDER : 0, &b, &err) == CW_OK)
			batch_free(&b);
	} else {
		/* signature-input \n signature \n content-digest \n content-type \n idempotency-key \n body */
		char *text = malloc(len + 1);
		if (!text)
			return 0;
		memcpy(text, body, len);
		text[len] = '\0';
		char *p = text;
		char *si = line(&p), *sig = line(&p);
		for (int i = 0; i < 3; i++)
			fields[i] = line(&p);
		fields[3] = "Bearer token";
		const char *rest = p ? p : "";
		struct httpsig_msg m = { "POST", "https://causeway.example:8443/v1/rooms/r_1/messages?x=1", header, NULL };
		static const char *const required[] = { "@method", "@target-uri", NULL };
		static const char *const if_present[] = { "content-digest", "content-type", "idempotency-key", NULL };
		struct httpsig_verify_opts o = {
			.required = required, .required_if_present = if_present, .require_created = true,
			.require_keyid = true, .require_nonce = true, .now = 1700000000, .max_skew_s = 300,
			.key_for = key_for, .check_content_digest = data[0] & 1, .body = rest, .body_len = strlen(rest),
		};
		struct httpsig_result res;
		cw_errmsg e;
		if (httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK)
			abort(); /* a signature made without the key verified */
		free(text);
	}
	return 0;
}
