#pragma once

// selfext's additions to ggml-rpc's public API (the library is libggml-rpc, as ggml-rpc.h).
//
// Where upstream's RPC client aborts the process when a server is unreachable, speaks another protocol or stops
// answering, selfext's records the failure here and lets the call fail: model loading fails, llama_decode
// returns an error, and a caller that finds ggml_backend_rpc_error_count() changed reports
// ggml_backend_rpc_last_error(). Every connect and call has a timeout (environment, in seconds):
//   SELFEXT_RPC_CONNECT_TIMEOUT  connect and hello (default 10)
//   SELFEXT_RPC_TIMEOUT          any later call, i.e. the longest a server may stay silent (default 600)

#include "ggml-backend.h"

#include <stdint.h>

#ifdef  __cplusplus
extern "C" {
#endif

// The number of RPC failures (connect, hello, lost connection) this process has seen; 0 when none.
GGML_BACKEND_API uint64_t ggml_backend_rpc_error_count(void);

// The most recent failure as one line naming the endpoint, e.g. "cannot reach RPC server 10.0.0.2:50052
// (Connection refused)"; "" when none. Valid until the next failure.
GGML_BACKEND_API const char * ggml_backend_rpc_last_error(void);

#ifdef  __cplusplus
}
#endif
