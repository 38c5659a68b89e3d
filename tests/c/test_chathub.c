/* The C ABI exercised from C against the generated header.
 *
 * Usage: test_chathub FIXTURES_DIR
 * FIXTURES_DIR is tests/fixtures; the expected replies are the official code's for the
 * chatglm3_conv2_zh case (a text reply), chatglm3_conv1_en (a metadata reply) and
 * glm4_hf_user_only_en, given here as C strings. Prints "N passed, M failed" and exits non-zero
 * on failure. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chathub.h"

static int passed = 0, failed = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (cond) {                                                            \
      passed++;                                                            \
    } else {                                                               \
      failed++;                                                            \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, "\n");                                               \
    }                                                                      \
  } while (0)

static const char *last_message(void) {
  const char *m = chathub_last_error_message();
  return m ? m : "(null)";
}

/* chatglm3_conv2_zh: the official chat() answers with text. */
static const ChathubMessage HISTORY[] = {
    {"system", "你是一个人工智能助手，请用中文回答问题。", NULL, NULL},
    {"user", "你好", NULL, NULL},
    {"assistant", "你好👋！我是人工智能助手，很高兴见到你，欢迎问我任何问题。", NULL, NULL},
};
static const char *PROMPT = "晚上睡不着应该怎么办？";
static const char *EXPECTED = "ary城市WistpulX\xef\xbf\xbd出是双语机器 helpnformerA<|system|> key智 y果m";
static const unsigned PROMPT_TOKENS = 55;

/* chatglm3_conv1_en: the reply's first line is not empty, so chat() returns {"name", "content"}. */
static const ChathubMessage HISTORY1[] = {
    {"system", "You are a helpful assistant.", NULL, NULL},
    {"user", "Hello! How are you today?", NULL, NULL},
    {"assistant", "I am fine, thank you. What can I do for you?", NULL, NULL},
};
static const char *PROMPT1 = "What is the capital of France?";
static const char *META_NAME = "ad\xef\xbf\xbd从数 in";
static const char *META_CONTENT = "\xef\xbf\xbd" "apit十e和练;\xef\xbf\xbd能\xef\xbf\xbd二gsipt\xef\xbf\xbd很former";

/* expected_tools/chatglm3_tools_*: tools and a past call, as THUDM's OpenAI demo maps them. */
static const char *TOOLS =
    "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"查询城市的实时天气\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"城市名\"}, \"unit\": {\"type\": \"string\", \"enum\": [\"c\", \"f\"]}}, \"required\": [\"city\"]}}}, {\"type\": \"function\", \"function\": {\"name\": \"add\", \"description\": \"Add two integers\", \"parameters\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}, \"b\": {\"type\": \"integer\"}}, \"required\": [\"a\", \"b\"]}}}]";

static ChathubParams greedy_params(int max_new_tokens) {
  ChathubParams p;
  chathub_params_default(&p);
  p.greedy = 1;
  p.max_new_tokens = max_new_tokens;
  return p;
}

struct collector {
  char text[4096];
  size_t len;
  int calls;
  int stop_after;
};

static bool collect(void *user_data, const uint8_t *utf8, size_t len) {
  struct collector *c = user_data;
  if (c->len + len < sizeof c->text) {
    memcpy(c->text + c->len, utf8, len);
    c->len += len;
    c->text[c->len] = 0;
  }
  c->calls++;
  return c->stop_after == 0 || c->calls < c->stop_after;
}

struct thread_arg {
  const ChathubModel *model;
  char *reply;
  int status;
};

static void *chat_thread(void *p) {
  struct thread_arg *arg = p;
  ChathubParams params = greedy_params(20);
  arg->status = chathub_chat(arg->model, PROMPT, HISTORY, 3, &params, &arg->reply, NULL, NULL);
  return NULL;
}

static void *error_thread(void *p) {
  (void)p;
  /* A failure on another thread does not touch this thread's last error. */
  const char *before = chathub_last_error_message();
  CHECK(before == NULL, "fresh thread has no error, got %s", before);
  return NULL;
}

static void tools_and_replies(const ChathubModel *model);
static void glm4_round_trip(const char *fixtures);

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s FIXTURES_DIR\n", argv[0]);
    return 2;
  }
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/chatglm3-tiny", argv[1]);
  const char *expected = EXPECTED;

  CHECK(chathub_abi_version() == CHATHUB_ABI_VERSION, "abi %u", chathub_abi_version());
  CHECK(chathub_version() && strlen(chathub_version()) > 0, "version");

  /* Loading errors. */
  ChathubModel *model = (ChathubModel *)1;
  CHECK(chathub_model_load(NULL, CHATHUB_FAMILY_AUTO, &model) == CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL dir");
  CHECK(model == NULL, "out_model cleared on failure");
  CHECK(strstr(last_message(), "model_dir") != NULL, "%s", last_message());
  CHECK(chathub_last_error_code() == CHATHUB_ERR_INVALID_ARGUMENT, "code");
  CHECK(chathub_model_load("/no/such/model", CHATHUB_FAMILY_AUTO, &model) == CHATHUB_ERR_NOT_FOUND,
        "missing dir");
  CHECK(strstr(last_message(), "/no/such/model") != NULL, "%s", last_message());
  CHECK(chathub_model_load(dir, 9, &model) == CHATHUB_ERR_INVALID_ARGUMENT, "bad family");
  CHECK(chathub_model_load(dir, CHATHUB_FAMILY_AUTO, NULL) == CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL out");
  CHECK(chathub_model_load("\xff\xfe", CHATHUB_FAMILY_AUTO, &model) == CHATHUB_ERR_INVALID_ARGUMENT,
        "bad UTF-8 path");
  CHECK(strstr(last_message(), "UTF-8") != NULL, "%s", last_message());

  /* Quantized weights through the options struct. */
  ChathubLoadOptions load_options;
  CHECK(chathub_load_options_default(&load_options) == CHATHUB_OK, "defaults");
  load_options.quantization = CHATHUB_QUANT_Q8_0;
  ChathubModel *quantized = NULL;
  CHECK(chathub_model_load_with(dir, &load_options, &quantized) == CHATHUB_OK, "%s", last_message());
  chathub_model_free(quantized);
  load_options.quantization = 42;
  CHECK(chathub_model_load_with(dir, &load_options, &quantized) == CHATHUB_ERR_INVALID_ARGUMENT,
        "bad quantization");
  CHECK(strstr(last_message(), "quantization") != NULL, "%s", last_message());

  /* Weight dtype, device and multi-turn options. */
  chathub_load_options_default(&load_options);
  CHECK(load_options.dtype == CHATHUB_DTYPE_DEFAULT && load_options.device == CHATHUB_DEVICE_CPU &&
            load_options.device_ordinal == 0 && load_options.prefix_cache_bytes == 0 &&
            load_options.disable_next_turn_warmup == 0,
        "defaults are zeros");
  load_options.dtype = 7;
  CHECK(chathub_model_load_with(dir, &load_options, &quantized) == CHATHUB_ERR_INVALID_ARGUMENT,
        "bad dtype");
  CHECK(strstr(last_message(), "dtype") != NULL, "%s", last_message());
  load_options.dtype = CHATHUB_DTYPE_DEFAULT;
  load_options.device = 5;
  CHECK(chathub_model_load_with(dir, &load_options, &quantized) == CHATHUB_ERR_INVALID_ARGUMENT,
        "bad device");
  CHECK(strstr(last_message(), "device") != NULL, "%s", last_message());
  load_options.device = CHATHUB_DEVICE_CUDA;
  ChathubModel *on_gpu = NULL;
  int gpu_rc = chathub_model_load_with(dir, &load_options, &on_gpu);
  /* A library built without `cuda` (or a machine without a GPU) says so. */
  CHECK(gpu_rc == CHATHUB_OK || (gpu_rc == CHATHUB_ERR_INVALID_ARGUMENT &&
                                 strstr(last_message(), "CUDA") != NULL),
        "%d %s", gpu_rc, last_message());
  chathub_model_free(on_gpu);

  CHECK(chathub_model_load(dir, CHATHUB_FAMILY_AUTO, &model) == CHATHUB_OK, "%s", last_message());
  if (!model) {
    printf("%d passed, %d failed\n", passed, failed + 1);
    return 1;
  }

  /* A whole reply, equal to the official greedy decode. */
  ChathubParams params = greedy_params(20);
  char *reply = NULL;
  size_t reply_len = 0;
  ChathubStats stats;
  int rc = chathub_chat(model, PROMPT, HISTORY, 3, &params, &reply, &reply_len, &stats);
  CHECK(rc == CHATHUB_OK, "%s", last_message());
  CHECK(reply && strcmp(reply, expected) == 0, "reply %s", reply ? reply : "(null)");
  CHECK(reply_len == strlen(expected), "len %zu", reply_len);
  CHECK(stats.completion_tokens == 20 && stats.prompt_tokens == PROMPT_TOKENS, "tokens %u %u",
        stats.prompt_tokens, stats.completion_tokens);
  CHECK(stats.reply_kind == CHATHUB_REPLY_TEXT, "kind %d", stats.reply_kind);
  CHECK(stats.finish_reason == CHATHUB_FINISH_LENGTH, "finish %d", stats.finish_reason);
  CHECK(stats.ttft_ms > 0, "ttft");

  /* f16 weight matrices give the same greedy reply on this model. */
  ChathubModel *half = NULL;
  chathub_load_options_default(&load_options);
  load_options.dtype = CHATHUB_DTYPE_F16;
  CHECK(chathub_model_load_with(dir, &load_options, &half) == CHATHUB_OK, "%s", last_message());
  char *half_reply = NULL;
  CHECK(half && chathub_chat(half, PROMPT, HISTORY, 3, &params, &half_reply, NULL, NULL) == CHATHUB_OK,
        "%s", last_message());
  CHECK(half_reply && strcmp(half_reply, expected) == 0, "f16 reply %s",
        half_reply ? half_reply : "(null)");
  chathub_string_free(half_reply);
  chathub_model_free(half);

  /* So does an f16 key/value cache; bf16 is not a cache dtype, and says so. */
  ChathubModel *half_cache = NULL;
  chathub_load_options_default(&load_options);
  CHECK(load_options.kv_cache_dtype == CHATHUB_DTYPE_DEFAULT, "default cache dtype");
  load_options.kv_cache_dtype = CHATHUB_DTYPE_F16;
  CHECK(chathub_model_load_with(dir, &load_options, &half_cache) == CHATHUB_OK, "%s",
        last_message());
  char *half_cache_reply = NULL;
  CHECK(half_cache && chathub_chat(half_cache, PROMPT, HISTORY, 3, &params, &half_cache_reply,
                                   NULL, NULL) == CHATHUB_OK,
        "%s", last_message());
  CHECK(half_cache_reply && strcmp(half_cache_reply, expected) == 0, "f16 cache reply %s",
        half_cache_reply ? half_cache_reply : "(null)");
  chathub_string_free(half_cache_reply);
  chathub_model_free(half_cache);
  load_options.kv_cache_dtype = CHATHUB_DTYPE_BF16;
  half_cache = NULL;
  CHECK(chathub_model_load_with(dir, &load_options, &half_cache) == CHATHUB_ERR_INVALID_ARGUMENT,
        "bf16 cache");
  CHECK(half_cache == NULL && strstr(last_message(), "kv_cache_dtype") != NULL, "%s",
        last_message());

  /* The same prompt again reuses the cache; with reuse turned off it never does. */
  char *again = NULL;
  CHECK(chathub_chat(model, PROMPT, HISTORY, 3, &params, &again, NULL, &stats) == CHATHUB_OK, "%s",
        last_message());
  CHECK(stats.cached_prompt_tokens > 0, "cached %u", stats.cached_prompt_tokens);
  chathub_string_free(again);
  ChathubModel *no_reuse = NULL;
  chathub_load_options_default(&load_options);
  load_options.prefix_cache_bytes = -1;
  load_options.disable_next_turn_warmup = 1;
  CHECK(chathub_model_load_with(dir, &load_options, &no_reuse) == CHATHUB_OK, "%s", last_message());
  for (int i = 0; no_reuse && i < 2; i++) {
    CHECK(chathub_chat(no_reuse, PROMPT, HISTORY, 3, &params, &again, NULL, &stats) == CHATHUB_OK,
          "%s", last_message());
    CHECK(stats.cached_prompt_tokens == 0, "cached %u without reuse", stats.cached_prompt_tokens);
    CHECK(again && strcmp(again, expected) == 0, "reply without reuse");
    chathub_string_free(again);
  }
  chathub_model_free(no_reuse);

  /* Stop strings end the reply before them. */
  const char *stop_texts[] = {"not in the reply", "双语"};
  ChathubParams with_stop = greedy_params(20);
  with_stop.stop = stop_texts;
  with_stop.stop_count = 2;
  char *stopped = NULL;
  CHECK(chathub_chat(model, PROMPT, HISTORY, 3, &with_stop, &stopped, NULL, &stats) == CHATHUB_OK,
        "%s", last_message());
  size_t cut = (size_t)(strstr(expected, "双语") - expected);
  CHECK(stopped && strlen(stopped) == cut && strncmp(stopped, expected, cut) == 0, "stopped: %s",
        stopped ? stopped : "(null)");
  CHECK(stats.finish_reason == CHATHUB_FINISH_STOP, "finish %d", stats.finish_reason);
  chathub_string_free(stopped);
  const char *bad_stop[] = {"\xff"};
  with_stop.stop = bad_stop;
  with_stop.stop_count = 1;
  CHECK(chathub_chat(model, PROMPT, HISTORY, 3, &with_stop, &stopped, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "stop not UTF-8");
  CHECK(strstr(last_message(), "stop[0]") != NULL, "%s", last_message());
  const char *empty_stop[] = {""};
  with_stop.stop = empty_stop;
  CHECK(chathub_chat(model, PROMPT, HISTORY, 3, &with_stop, &stopped, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "empty stop");
  with_stop.stop = NULL;
  CHECK(chathub_chat(model, PROMPT, HISTORY, 3, &with_stop, &stopped, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL stop with a count");
  CHECK(strstr(last_message(), "stop") != NULL, "%s", last_message());

  /* Streaming adds up to the same text. */
  struct collector c = {{0}, 0, 0, 0};
  rc = chathub_chat_stream(model, PROMPT, HISTORY, 3, &params, collect, &c, &stats);
  CHECK(rc == CHATHUB_OK, "%s", last_message());
  CHECK(strcmp(c.text, expected) == 0, "streamed %s", c.text);
  CHECK(c.calls > 1, "calls %d", c.calls);

  /* Returning false stops within one token. */
  struct collector stop = {{0}, 0, 0, 2};
  rc = chathub_chat_stream(model, PROMPT, HISTORY, 3, &params, collect, &stop, &stats);
  CHECK(rc == CHATHUB_OK, "%s", last_message());
  CHECK(stop.calls == 2, "calls after false: %d", stop.calls);
  CHECK(stats.finish_reason == CHATHUB_FINISH_CANCELLED, "finish %d", stats.finish_reason);
  CHECK(stats.completion_tokens < 20, "stopped early: %u", stats.completion_tokens);

  /* Bad requests: a status and a message, the model still usable. */
  char *none = (char *)1;
  CHECK(chathub_chat(NULL, PROMPT, NULL, 0, NULL, &none, NULL, NULL) == CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL model");
  CHECK(none == NULL, "out_reply cleared");
  CHECK(chathub_chat(model, "\xc3\x28", NULL, 0, &params, &none, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "bad UTF-8 prompt");
  CHECK(strstr(last_message(), "prompt is not valid UTF-8") != NULL, "%s", last_message());
  CHECK(chathub_chat(model, "", NULL, 0, &params, &none, NULL, NULL) == CHATHUB_ERR_INVALID_ARGUMENT,
        "empty prompt");
  ChathubMessage bad_role[] = {{"wizard", "hi", NULL, NULL}};
  CHECK(chathub_chat(model, PROMPT, bad_role, 1, &params, &none, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "unknown role");
  CHECK(strstr(last_message(), "wizard") != NULL, "%s", last_message());
  ChathubMessage null_content[] = {{"user", NULL, NULL, NULL}};
  CHECK(chathub_chat(model, PROMPT, null_content, 1, &params, &none, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL content");
  CHECK(strstr(last_message(), "history[0].content") != NULL, "%s", last_message());
  CHECK(chathub_chat(model, PROMPT, NULL, 2, &params, &none, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL history with a length");
  ChathubParams negative = greedy_params(5);
  negative.max_length = -1;
  CHECK(chathub_chat(model, PROMPT, NULL, 0, &negative, &none, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "negative max_length");
  CHECK(strstr(last_message(), "max_length") != NULL, "%s", last_message());
  ChathubParams top_p = greedy_params(5);
  top_p.top_p = 1.5f;
  CHECK(chathub_chat(model, PROMPT, NULL, 0, &top_p, &none, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "top_p > 1");
  CHECK(strstr(last_message(), "top_p") != NULL, "%s", last_message());
  ChathubParams tiny = greedy_params(5);
  tiny.max_length = 4;
  CHECK(chathub_chat(model, PROMPT, NULL, 0, &tiny, &none, NULL, NULL) == CHATHUB_ERR_PROMPT_TOO_LONG,
        "prompt too long");
  CHECK(chathub_chat_stream(model, PROMPT, NULL, 0, &params, NULL, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL callback");
  CHECK(chathub_params_default(NULL) == CHATHUB_ERR_INVALID_ARGUMENT, "NULL params out");

  pthread_t other;
  pthread_create(&other, NULL, error_thread, NULL);
  pthread_join(other, NULL);

  /* Four threads on one model give the single-threaded reply. */
  struct thread_arg args[4];
  pthread_t threads[4];
  for (int i = 0; i < 4; i++) {
    args[i].model = model;
    args[i].reply = NULL;
    pthread_create(&threads[i], NULL, chat_thread, &args[i]);
  }
  for (int i = 0; i < 4; i++) {
    pthread_join(threads[i], NULL);
    CHECK(args[i].status == CHATHUB_OK && args[i].reply && strcmp(args[i].reply, reply) == 0,
          "thread %d", i);
    chathub_string_free(args[i].reply);
  }

  tools_and_replies(model);
  chathub_string_free(reply);
  chathub_string_free(NULL);
  chathub_model_free(model);
  chathub_model_free(NULL);
  glm4_round_trip(argv[1]);

  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

/* The reply object: the official chat() value, tools in, tool calls and results in history. */
static void tools_and_replies(const ChathubModel *model) {
  ChathubParams params = greedy_params(20);
  ChathubReply *reply = (ChathubReply *)1;
  ChathubStats stats;
  CHECK(chathub_chat_reply(model, PROMPT1, HISTORY1, 3, &params, NULL, NULL, &reply, &stats) ==
            CHATHUB_OK,
        "%s", last_message());
  CHECK(chathub_reply_kind(reply) == CHATHUB_REPLY_METADATA, "kind %d", chathub_reply_kind(reply));
  CHECK(stats.reply_kind == CHATHUB_REPLY_METADATA, "stats kind %d", stats.reply_kind);
  const char *name = chathub_reply_tool_name(reply);
  CHECK(name && strcmp(name, META_NAME) == 0, "name %s", name ? name : "(null)");
  const char *content = chathub_reply_text(reply);
  CHECK(content && strcmp(content, META_CONTENT) == 0, "content %s", content ? content : "(null)");
  CHECK(chathub_reply_arguments_json(reply) == NULL, "no arguments");
  const char *json = chathub_reply_json(reply);
  CHECK(json && strstr(json, "\"name\"") && strstr(json, "\"content\""), "json %s",
        json ? json : "(null)");
  const char *raw = chathub_reply_raw_text(reply);
  CHECK(raw && strncmp(raw, META_NAME, strlen(META_NAME)) == 0 && raw[strlen(META_NAME)] == '\n',
        "raw %s", raw ? raw : "(null)");
  chathub_reply_free(reply);
  chathub_reply_free(NULL);
  CHECK(chathub_reply_kind(NULL) == -1 && chathub_reply_text(NULL) == NULL, "NULL reply");

  /* A text reply streams its text through the callback too. */
  struct collector c = {{0}, 0, 0, 0};
  CHECK(chathub_chat_reply(model, PROMPT, HISTORY, 3, &params, collect, &c, &reply, NULL) ==
            CHATHUB_OK,
        "%s", last_message());
  CHECK(chathub_reply_kind(reply) == CHATHUB_REPLY_TEXT, "kind");
  CHECK(strcmp(chathub_reply_text(reply), EXPECTED) == 0 && strcmp(c.text, EXPECTED) == 0,
        "text %s / streamed %s", chathub_reply_text(reply), c.text);
  chathub_reply_free(reply);

  /* Tools without history: the demo's default system message (970 prompt tokens). */
  ChathubParams with_tools = greedy_params(1);
  with_tools.tools_json = TOOLS;
  CHECK(chathub_chat_reply(model, "北京今天天气怎么样？", NULL, 0, &with_tools, NULL, NULL, &reply,
                           &stats) == CHATHUB_OK,
        "%s", last_message());
  CHECK(stats.prompt_tokens == 970, "prompt %u", stats.prompt_tokens);
  chathub_reply_free(reply);

  /* A past call and its result in the history, the request's own system text (1011). */
  ChathubMessage history[] = {
      {"system", "You are a careful assistant.", NULL, NULL},
      {"user", "What is 2 + 40?", NULL, NULL},
      {"assistant", "",
       "[{\"id\": \"call_1\", \"type\": \"function\", \"function\": {\"name\": \"add\", "
       "\"arguments\": \"{\\\"a\\\": 2, \\\"b\\\": 40}\"}}]",
       NULL},
      {"tool", "{\"result\": 42}", NULL, "call_1"},
  };
  CHECK(chathub_chat_reply(model, "Thanks. And the weather in Paris, in f?", history, 4,
                           &with_tools, NULL, NULL, &reply, &stats) == CHATHUB_OK,
        "%s", last_message());
  CHECK(stats.prompt_tokens == 1011, "prompt %u", stats.prompt_tokens);
  chathub_reply_free(reply);

  /* The tool's result as the new message (the official chat(role="observation")): the same
     prompt up to where the fixture's next <|user|> turn starts (position 988), then
     <|assistant|>: 989 tokens. */
  with_tools.prompt_role = "tool";
  CHECK(chathub_chat_reply(model, "{\"result\": 42}", history, 3, &with_tools, NULL, NULL, &reply,
                           &stats) == CHATHUB_OK,
        "%s", last_message());
  CHECK(stats.prompt_tokens == 989, "prompt %u", stats.prompt_tokens);
  chathub_reply_free(reply);
  with_tools.prompt_role = "assistant";
  CHECK(chathub_chat_reply(model, "hi", NULL, 0, &with_tools, NULL, NULL, &reply, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "assistant prompt");
  CHECK(strstr(last_message(), "prompt_role") != NULL, "%s", last_message());
  with_tools.prompt_role = "robot";
  CHECK(chathub_chat_reply(model, "hi", NULL, 0, &with_tools, NULL, NULL, &reply, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "unknown role");
  CHECK(strstr(last_message(), "prompt_role") != NULL, "%s", last_message());
  with_tools.prompt_role = NULL;

  /* Bad JSON is an argument error naming the field. */
  with_tools.tools_json = "[{\"type\": \"function\"}";
  CHECK(chathub_chat_reply(model, PROMPT, NULL, 0, &with_tools, NULL, NULL, &reply, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "bad tools");
  CHECK(reply == NULL && strstr(last_message(), "tools_json") != NULL, "%s", last_message());
  history[2].tool_calls_json = "{}";
  with_tools.tools_json = TOOLS;
  CHECK(chathub_chat_reply(model, PROMPT, history, 4, &with_tools, NULL, NULL, &reply, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "tool calls not an array");
  CHECK(strstr(last_message(), "history[2].tool_calls_json") != NULL, "%s", last_message());
  CHECK(chathub_chat_reply(model, PROMPT, NULL, 0, NULL, NULL, NULL, NULL, NULL) ==
            CHATHUB_ERR_INVALID_ARGUMENT,
        "NULL out_reply");
}

/* GLM-4 through the same calls: glm4_hf_user_only_en, token for token. */
static void glm4_round_trip(const char *fixtures) {
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/glm4/glm4-hf-tiny", fixtures);
  ChathubModel *glm4 = NULL;
  CHECK(chathub_model_load(dir, CHATHUB_FAMILY_GLM4, &glm4) == CHATHUB_OK, "%s", last_message());
  if (!glm4) {
    return;
  }
  ChathubParams params = greedy_params(20);
  ChathubReply *reply = NULL;
  ChathubStats stats;
  CHECK(chathub_chat_reply(glm4, "What is the capital of France?", NULL, 0, &params, NULL, NULL,
                           &reply, &stats) == CHATHUB_OK,
        "%s", last_message());
  CHECK(stats.prompt_tokens == 12 && stats.completion_tokens == 20, "tokens %u %u",
        stats.prompt_tokens, stats.completion_tokens);
  const char *raw = chathub_reply_raw_text(reply);
  CHECK(raw && strncmp(raw, "aying do\xef\xbf\xbd.\n\n然后就走了", strlen("aying do\xef\xbf\xbd.\n\n然后就走了")) == 0,
        "raw %s", raw ? raw : "(null)");
  CHECK(chathub_reply_kind(reply) == CHATHUB_REPLY_METADATA, "kind %d", chathub_reply_kind(reply));
  chathub_reply_free(reply);
  chathub_model_free(glm4);
}
