#pragma once

// Internal to ggml-rpc: timeouts, connect with a timeout, failure records (ggml-rpc-selfext.cpp), and the
// RPC_CMD_SUPPORTS_OP messages (ggml-rpc-selfext.inc, compiled inside ggml-rpc.cpp).

#include "ggml-rpc-selfext.h"
#include "ggml.h"

#include <cstddef>
#include <cstdint>
#include <string>

#ifdef _WIN32
#  include <winsock2.h>
typedef SOCKET selfext_sockfd_t;
typedef int    selfext_socklen_t;
#else
#  include <sys/socket.h>
typedef int       selfext_sockfd_t;
typedef socklen_t selfext_socklen_t;
#endif

// seconds, from SELFEXT_RPC_CONNECT_TIMEOUT / SELFEXT_RPC_TIMEOUT (read once)
double selfext_rpc_connect_timeout();
double selfext_rpc_call_timeout();

// ::connect within selfext_rpc_connect_timeout(), then receive/send timeouts of that length (for the hello);
// 0, or -1 with errno set (ETIMEDOUT when the time ran out)
int  selfext_rpc_connect(selfext_sockfd_t fd, const struct sockaddr * addr, selfext_socklen_t len);
// SO_RCVTIMEO and SO_SNDTIMEO of `seconds`
bool selfext_rpc_set_timeouts(selfext_sockfd_t fd, double seconds);

// records a failure (printf-style, one line): counted, kept for ggml_backend_rpc_last_error, logged as an error
void selfext_rpc_fail(const char * fmt, ...);

// records why the hello to `endpoint` failed after `elapsed_s` seconds: no answer in time, or a closed connection
void selfext_rpc_hello_failed(const std::string & endpoint, double elapsed_s);

// why a call to `endpoint` that ran for `elapsed_s` seconds failed: a timeout, or the connection went away
std::string selfext_rpc_lost(const std::string & endpoint, double elapsed_s);

// RPC_CMD_SUPPORTS_OP's messages (defined in ggml-rpc-selfext.inc, where rpc_tensor is known)
struct rpc_msg_supports_op_req;
struct rpc_msg_supports_op_rsp;
