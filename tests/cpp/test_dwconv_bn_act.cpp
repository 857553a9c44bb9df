// ctest: load libfastdw, call fastdw::dwconv_bn_act and fastdw::_dwconv_bn_act_backward through
// the dispatcher on CPU tensors, and compare with stock libtorch ops (conv2d(groups=C) * scale +
// shift, then the activation; gradients by autograd through that reference).
//
//   fastdw_cpp_test /path/to/libfastdw.so
#include <dlfcn.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

torch::Tensor act_ref(const torch::Tensor& u, const std::string& act) {
  if (act == "relu") return torch::relu(u);
  if (act == "relu6") return torch::clamp(u, 0, 6);
  if (act == "hardswish") return torch::hardswish(u);
  if (act == "silu") return torch::silu(u);
  return u;
}

torch::Tensor ref_forward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s,
                          const torch::Tensor& b, int64_t stride, int64_t pad, const std::string& act) {
  const int64_t C = x.size(1);
  auto z = torch::conv2d(x, w, {}, stride, pad, 1, C);
  return act_ref(z * s.view({1, C, 1, 1}) + b.view({1, C, 1, 1}), act);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s /path/to/libfastdw.so\n", argv[0]);
    return 2;
  }
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("fastdw::dwconv_bn_act", "")
                 .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const std::optional<torch::Tensor>&,
                                      const std::optional<torch::Tensor>&, c10::IntArrayRef, c10::IntArrayRef,
                                      c10::IntArrayRef, c10::string_view)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("fastdw::_dwconv_bn_act_backward", "")
                 .typed<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>(
                     const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                     const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&, c10::IntArrayRef,
                     c10::IntArrayRef, c10::IntArrayRef, c10::string_view, std::array<bool, 4>, bool)>();

  torch::manual_seed(0);
  const std::vector<std::string> acts = {"none", "relu", "relu6", "hardswish", "silu"};
  for (bool channels_last : {false, true}) {
    for (int64_t stride : {1, 2}) {
      for (const auto& act : acts) {
        const int64_t N = 2, C = 24, H = 15, W = 13;
        auto x = torch::randn({N, C, H, W}, torch::kFloat64);
        if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
        auto w = torch::randn({C, 1, 3, 3}, torch::kFloat64) / 3;
        auto s = torch::rand({C}, torch::kFloat64) * 2.5 + 0.5;
        auto b = torch::randn({C}, torch::kFloat64);
        const std::string tag = std::string(channels_last ? "channels_last" : "contiguous") + " stride " +
                                std::to_string(stride) + " " + act;

        auto y = fwd.call(x, w, s, b, {stride, stride}, {1, 1}, {1, 1}, act);
        auto xr = x.detach().clone().requires_grad_(true);
        auto wr = w.detach().clone().requires_grad_(true);
        auto sr = s.detach().clone().requires_grad_(true);
        auto br = b.detach().clone().requires_grad_(true);
        auto yr = ref_forward(xr, wr, sr, br, stride, 1, act);
        check(y.sizes() == yr.sizes() && torch::allclose(y, yr.detach(), 1e-10, 1e-12), "forward " + tag);
        check(y.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "output layout " + tag);

        auto go = torch::randn_like(yr);
        auto gr = torch::autograd::grad({yr}, {xr, wr, sr, br}, {go});
        auto g = bwd.call(go, x, w, s, b, {stride, stride}, {1, 1}, {1, 1}, act, {true, true, true, true}, true);
        const char* names[4] = {"dx", "dweight", "dscale", "dshift"};
        const torch::Tensor got[4] = {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g)};
        for (int i = 0; i < 4; ++i) {
          check(torch::allclose(got[i], gr[i], 1e-9, 1e-10), std::string(names[i]) + " " + tag);
        }
      }
    }
  }
  // bad input: a clear error naming the constraint, through the dispatcher
  try {
    auto x = torch::randn({1, 4, 5, 5});
    fwd.call(x, torch::randn({3, 1, 3, 3}), {}, {}, {1, 1}, {1, 1}, {1, 1}, "relu6");
    check(false, "channel mismatch raises");
  } catch (const c10::Error& e) {
    check(std::string(e.what()).find("C == x.size(1)") != std::string::npos, "channel mismatch raises a clear error");
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
