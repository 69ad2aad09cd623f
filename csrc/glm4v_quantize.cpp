// Quantization of text-model GGUFs with the engine's own quantizer (llama_model_quantize),
// so one command goes from a Hugging Face checkpoint to a K-quant file.

#include "glm4v_internal.h"

#include "llama.h"

#include <cstring>
#include <string>

namespace {

struct ftype_name {
    const char * name;
    llama_ftype ftype;
};

// The names llama-quantize accepts, lower case.
const ftype_name k_ftypes[] = {
    {"f32", LLAMA_FTYPE_ALL_F32},        {"f16", LLAMA_FTYPE_MOSTLY_F16},
    {"bf16", LLAMA_FTYPE_MOSTLY_BF16},   {"q8_0", LLAMA_FTYPE_MOSTLY_Q8_0},
    {"q4_0", LLAMA_FTYPE_MOSTLY_Q4_0},   {"q4_1", LLAMA_FTYPE_MOSTLY_Q4_1},
    {"q5_0", LLAMA_FTYPE_MOSTLY_Q5_0},   {"q5_1", LLAMA_FTYPE_MOSTLY_Q5_1},
    {"q2_k", LLAMA_FTYPE_MOSTLY_Q2_K},   {"q2_k_s", LLAMA_FTYPE_MOSTLY_Q2_K_S},
    {"q3_k_s", LLAMA_FTYPE_MOSTLY_Q3_K_S}, {"q3_k_m", LLAMA_FTYPE_MOSTLY_Q3_K_M},
    {"q3_k_l", LLAMA_FTYPE_MOSTLY_Q3_K_L}, {"q4_k_s", LLAMA_FTYPE_MOSTLY_Q4_K_S},
    {"q4_k_m", LLAMA_FTYPE_MOSTLY_Q4_K_M}, {"q5_k_s", LLAMA_FTYPE_MOSTLY_Q5_K_S},
    {"q5_k_m", LLAMA_FTYPE_MOSTLY_Q5_K_M}, {"q6_k", LLAMA_FTYPE_MOSTLY_Q6_K},
    {"iq4_nl", LLAMA_FTYPE_MOSTLY_IQ4_NL}, {"iq4_xs", LLAMA_FTYPE_MOSTLY_IQ4_XS},
};

}  // namespace

extern "C" glm4v_status glm4v_quantize(const char * src_path, const char * dst_path, const char * ftype,
                                       int32_t n_threads) {
    glm4v_detail::install_log_once();
    glm4v_detail::begin_api_call(nullptr);
    if (!src_path || !dst_path || !ftype) {
        return glm4v_detail::fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "source, destination and type are required");
    }
    const ftype_name * found = nullptr;
    std::string valid;
    for (const auto & f : k_ftypes) {
        if (strcmp(f.name, ftype) == 0) found = &f;
        valid += valid.empty() ? f.name : std::string(", ") + f.name;
    }
    if (!found) {
        return glm4v_detail::fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT,
                                 std::string("unknown quantization type '") + ftype + "' (valid: " + valid + ")");
    }
    try {
        llama_model_quantize_params qp = llama_model_quantize_default_params();
        qp.nthread = n_threads;
        qp.ftype = found->ftype;
        const uint32_t rc = llama_model_quantize(src_path, dst_path, &qp);
        if (rc != 0) {
            return glm4v_detail::fail(nullptr, GLM4V_ERR_LOAD, std::string("quantizing '") + src_path + "' failed");
        }
        return GLM4V_OK;
    } catch (const std::exception & e) {
        return glm4v_detail::fail(nullptr, GLM4V_ERR_INTERNAL, std::string("quantizing failed: ") + e.what());
    }
}
