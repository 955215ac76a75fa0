/*
 * A one-question chat through lutra's C library: loads the model given as argv[1], asks
 * "What is the capital of France?" with greedy sampling, prints the reply as it streams.
 *
 *   cargo build --release -p lutra-capi
 *   cc -std=c11 -Wall -Wextra -Werror examples/c/chat.c -Iinclude -Ltarget/release -llutra \
 *      -Wl,-rpath,"$PWD/target/release" -o target/chat-c
 *   target/chat-c models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
 */
#include <stdio.h>
#include <string.h>

#include "lutra.h"

/* Prints each piece as it arrives; returning 0 keeps generating. */
static int print_piece(const char *piece, void *user_data) {
    size_t *pieces = user_data;
    ++*pieces;
    fputs(piece, stdout);
    fflush(stdout);
    return 0;
}

static int fail(const char *what) {
    const char *message = lutra_last_error();
    fprintf(stderr, "chat: %s: %s\n", what, message ? message : "unknown error");
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }

    lutra_model *model = lutra_model_load(argv[1], NULL);
    if (model == NULL) {
        return fail("loading the model");
    }
    lutra_session *session = lutra_session_new(model, NULL);
    /* The session holds the model: the model handle is not needed any more. */
    lutra_model_free(model);
    if (session == NULL) {
        return fail("starting a session");
    }

    lutra_generate_params params = lutra_generate_params_default();
    params.temperature = 0.0f; /* greedy */
    params.max_tokens = 64;

    size_t pieces = 0;
    char *reply = NULL;
    int status = lutra_session_send(session, "What is the capital of France?", &params,
                                    print_piece, &pieces, &reply);
    putchar('\n');
    if (status != 0) {
        lutra_session_free(session);
        return fail("generating the reply");
    }
    fprintf(stderr, "chat: %zu pieces, %zu bytes (lutra %s)\n", pieces,
            reply ? strlen(reply) : 0, lutra_version());
    lutra_string_free(reply);
    lutra_session_free(session);
    return 0;
}
