// Devices and ggml RPC: the servers' devices placed for one model (never registered in the
// process-wide registry, so nothing else picks them up by accident), the projector's device,
// and the RPC server run from this library.

#include "glm4v_internal.h"

#include "ggml-backend.h"
#include "ggml-rpc.h"

#include <cstring>
#include <string>
#include <vector>

namespace {

using add_server_fn = ggml_backend_reg_t (*)(const char * endpoint);
using start_server_fn = void (*)(const char * endpoint, const char * cache_dir, size_t n_threads, size_t n_devices,
                                 ggml_backend_dev_t * devices);
// Engine patch 0006: failures of an endpoint so far (and the last one's text), the client timeout.
using failure_count_fn = uint64_t (*)(const char * endpoint, char * msg, size_t cap);
using set_timeout_fn = void (*)(int ms);

ggml_backend_reg_t rpc_reg() { return ggml_backend_reg_by_name("RPC"); }

template <typename F>
F rpc_proc(const char * name) {
    ggml_backend_reg_t reg = rpc_reg();
    return reg ? (F) ggml_backend_reg_get_proc_address(reg, name) : nullptr;
}

std::vector<std::string> split_csv(const char * csv) {
    std::vector<std::string> out;
    std::string cur;
    for (const char * p = csv; p && *p; ++p) {
        if (*p == ',') {
            out.push_back(cur);
            cur.clear();
        } else {
            cur += *p;
        }
    }
    if (!cur.empty() || (csv && *csv)) out.push_back(cur);
    return out;
}

bool valid_endpoint(const std::string & ep) {
    const size_t colon = ep.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == ep.size()) return false;
    for (size_t i = colon + 1; i < ep.size(); ++i) {
        if (ep[i] < '0' || ep[i] > '9') return false;
    }
    const long port = std::strtol(ep.c_str() + colon + 1, nullptr, 10);
    return port > 0 && port < 65536;
}

}  // namespace

namespace glm4v_detail {

bool rpc_place(const glm4v_load_params * params, glm4v_rpc_placement & out, std::string & err) {
    const std::vector<std::string> servers = split_csv(params->rpc_servers);
    if (servers.empty()) {
        if (params->mmproj_rpc_server >= 0) {
            err = "mmproj_rpc_server is set but no rpc_servers are given";
            return false;
        }
        if (params->tensor_split && params->n_tensor_split > 0) {
            err = "tensor_split needs rpc_servers";
            return false;
        }
        return true;
    }
    auto add_server = rpc_proc<add_server_fn>("ggml_backend_rpc_add_server");
    if (!add_server) {
        err = "this engine was built without the RPC backend (GGML_RPC=OFF)";
        return false;
    }
    if (auto set_timeout = rpc_proc<set_timeout_fn>("ggml_backend_rpc_set_timeout_ms")) {
        set_timeout(params->rpc_timeout_ms);
    }
    out.failure_count = rpc_proc<failure_count_fn>("ggml_backend_rpc_failure_count");
    std::vector<size_t> first_dev;
    for (const std::string & ep : servers) {
        out.endpoints.push_back(ep);
        out.failures.push_back(out.failure_count ? out.failure_count(ep.c_str(), nullptr, 0) : 0);
        if (!valid_endpoint(ep)) {
            err = fmt("rpc server '%s': expected host:port", ep.c_str());
            return false;
        }
        ggml_backend_reg_t reg = add_server(ep.c_str());
        const size_t n = reg ? ggml_backend_reg_dev_count(reg) : 0;
        if (n == 0) {
            err = fmt("rpc server %s exposes no devices", ep.c_str());
            return false;
        }
        first_dev.push_back(out.devices.size());
        for (size_t i = 0; i < n; ++i) out.devices.push_back(ggml_backend_reg_dev_get(reg, i));
    }
    // Local GPUs after the servers, as the engine orders devices when it picks them itself.
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) out.devices.push_back(dev);
    }
    const size_t max_dev = llama_max_devices();
    if (params->tensor_split && params->n_tensor_split > 0) {
        if ((size_t) params->n_tensor_split > out.devices.size() || (size_t) params->n_tensor_split > max_dev) {
            err = fmt("tensor_split has %d entries for %zu devices", params->n_tensor_split, out.devices.size());
            return false;
        }
        out.split.assign(max_dev, 0.0f);
        float sum = 0.0f;
        for (int32_t i = 0; i < params->n_tensor_split; ++i) {
            const float v = params->tensor_split[i];
            if (!(v >= 0.0f) || v > 1e30f) {
                err = fmt("tensor_split[%d] = %g: must be a finite number >= 0", i, (double) v);
                return false;
            }
            out.split[i] = v;
            sum += v;
        }
        if (!(sum > 0.0f)) {
            err = "tensor_split must have a positive entry";
            return false;
        }
    }
    if (out.devices.size() > max_dev) {
        err = fmt("%zu devices, the engine places layers on at most %zu", out.devices.size(), max_dev);
        return false;
    }
    if (params->mmproj_rpc_server >= (int32_t) servers.size()) {
        err = fmt("mmproj_rpc_server %d: there are %zu rpc servers", params->mmproj_rpc_server, servers.size());
        return false;
    }
    if (params->mmproj_rpc_server >= 0) out.mmproj_device = out.devices[first_dev[(size_t) params->mmproj_rpc_server]];
    out.devices.push_back(nullptr);
    return true;
}

bool rpc_check(glm4v_model * m) {
    if (m->rpc_lost.load()) return true;
    if (!m->rpc_failures) return false;  // no servers (or an engine without patch 0006)
    for (size_t i = 0; i < m->rpc_endpoints.size(); ++i) {
        char what[512];
        if (m->rpc_failures(m->rpc_endpoints[i].c_str(), what, sizeof(what)) != m->rpc_seen[i]) {
            std::lock_guard<std::mutex> lk(m->rpc_mu);
            if (!m->rpc_lost.load()) {
                m->rpc_lost_msg = fmt("RPC server %s: %s", m->rpc_endpoints[i].c_str(), what);
                m->rpc_lost.store(true);
            }
            return true;
        }
    }
    return false;
}

std::string rpc_message(glm4v_model * m) {
    std::lock_guard<std::mutex> lk(m->rpc_mu);
    return m->rpc_lost_msg;
}

std::string rpc_call_error(glm4v_model * m, const std::string & what) {
    return what + " failed: " + rpc_message(m) + "; the model's state on its servers is lost: close it and load it again";
}

}  // namespace glm4v_detail

using namespace glm4v_detail;

extern "C" {

int32_t glm4v_device_count(void) {
    install_log_once();
    return (int32_t) ggml_backend_dev_count();
}

glm4v_status glm4v_device_get(int32_t index, glm4v_device_info * out) {
    begin_api_call(nullptr);
    if (!out || index < 0 || (size_t) index >= ggml_backend_dev_count()) {
        return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "device index out of range");
    }
    ggml_backend_dev_t dev = ggml_backend_dev_get((size_t) index);
    std::memset(out, 0, sizeof(*out));
    std::snprintf(out->name, sizeof(out->name), "%s", ggml_backend_dev_name(dev));
    std::snprintf(out->description, sizeof(out->description), "%s", ggml_backend_dev_description(dev));
    out->type = (int32_t) ggml_backend_dev_type(dev);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    out->memory_free = free;
    out->memory_total = total;
    return GLM4V_OK;
}

int32_t glm4v_rpc_available(void) {
    install_log_once();
    return rpc_proc<add_server_fn>("ggml_backend_rpc_add_server") != nullptr ? 1 : 0;
}

void glm4v_rpc_version(int32_t * major, int32_t * minor, int32_t * patch) {
    if (major) *major = RPC_PROTO_MAJOR_VERSION;
    if (minor) *minor = RPC_PROTO_MINOR_VERSION;
    if (patch) *patch = RPC_PROTO_PATCH_VERSION;
}

glm4v_status glm4v_rpc_serve(const char * endpoint, const char * cache_dir, int32_t n_threads,
                             const char * devices_csv) {
    install_log_once();
    begin_api_call(nullptr);
    if (!endpoint || !valid_endpoint(endpoint)) {
        return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "endpoint must be host:port");
    }
    if (n_threads <= 0) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "n_threads must be positive");
    auto start = rpc_proc<start_server_fn>("ggml_backend_rpc_start_server");
    if (!start) return fail(nullptr, GLM4V_ERR_LOAD, "this engine was built without the RPC backend (GGML_RPC=OFF)");
    std::vector<ggml_backend_dev_t> devices;
    const std::vector<std::string> names = split_csv(devices_csv);
    for (const std::string & name : names) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_name(name.c_str());
        if (!dev) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, fmt("no device named '%s'", name.c_str()));
        devices.push_back(dev);
    }
    if (devices.empty()) {  // as the engine's own rpc-server: every GPU, else the CPU
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            const auto type = ggml_backend_dev_type(dev);
            if (type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) devices.push_back(dev);
        }
        if (devices.empty()) {
            ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
            if (!cpu) return fail(nullptr, GLM4V_ERR_LOAD, "no CPU device");
            devices.push_back(cpu);
        }
    }
    start(endpoint, cache_dir && cache_dir[0] ? cache_dir : nullptr, (size_t) n_threads, devices.size(),
          devices.data());
    return fail(nullptr, GLM4V_ERR_LOAD,
                fmt("the RPC server on %s stopped: it could not bind its socket or accept a client", endpoint));
}

}  // extern "C"
