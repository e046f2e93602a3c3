#include <syncbn/replicate.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

namespace syncbn {

namespace {

// Throws a ValueError naming the first position where `replica` differs from the master.
void check_isomorphic(const std::vector<ReplicaModule>& master, const std::vector<ReplicaModule>& replica,
                      size_t copy_id) {
  const size_t common = std::min(master.size(), replica.size());
  for (size_t position = 0; position < common; ++position) {
    TORCH_CHECK_VALUE(master[position].type_name == replica[position].type_name,
                      "replicas are not isomorphic: at module position ", position, " copy 0 has ",
                      master[position].type_name, " but copy ", copy_id, " has ", replica[position].type_name);
  }
  if (master.size() != replica.size()) {
    const bool master_longer = master.size() > replica.size();
    TORCH_CHECK_VALUE(false, "replicas are not isomorphic: copy 0 has ", master.size(), " modules but copy ", copy_id,
                      " has ", replica.size(), "; at module position ", common, " copy 0 has ",
                      master_longer ? master[common].type_name : std::string("<no module>"), " but copy ", copy_id,
                      " has ", master_longer ? std::string("<no module>") : replica[common].type_name);
  }
}

}  // namespace

std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::vector<ReplicaModule>>& replicas) {
  TORCH_CHECK_VALUE(!replicas.empty(), "execute_replication_callbacks needs at least one replica");
  const auto& master = replicas.front();
  for (size_t copy_id = 1; copy_id < replicas.size(); ++copy_id) {
    check_isomorphic(master, replicas[copy_id], copy_id);
  }
  auto group = std::make_shared<ReplicationGroup>(static_cast<int64_t>(replicas.size()));
  std::vector<std::shared_ptr<CallbackContext>> contexts;
  contexts.reserve(master.size());
  for (size_t position = 0; position < master.size(); ++position) {
    contexts.push_back(std::make_shared<CallbackContext>(group, static_cast<int64_t>(position), master[position].name));
  }
  // Replica-major order: all of copy 0 first, so at every position the master
  // has stored its shared state before any other copy looks for it.
  const ReplicationSetupScope setting_up(group);
  for (size_t copy_id = 0; copy_id < replicas.size(); ++copy_id) {
    const auto& modules = replicas[copy_id];
    for (size_t position = 0; position < modules.size(); ++position) {
      if (modules[position].on_replicate) {
        modules[position].on_replicate(contexts[position], static_cast<int64_t>(copy_id));
      }
    }
  }
  return contexts;
}

std::vector<std::shared_ptr<CallbackContext>> execute_replication_callbacks(
    const std::vector<std::shared_ptr<torch::nn::Module>>& replicas) {
  std::vector<std::vector<ReplicaModule>> views;
  views.reserve(replicas.size());
  for (size_t copy_id = 0; copy_id < replicas.size(); ++copy_id) {
    TORCH_CHECK_VALUE(replicas[copy_id] != nullptr, "replica ", copy_id, " is null");
    std::vector<ReplicaModule> view;
    for (const auto& item : replicas[copy_id]->named_modules(/*name_prefix=*/"", /*include_self=*/true)) {
      const auto& module = item.value();
      ReplicaModule entry{module->name(), {}, item.key()};
      if (auto hook = std::dynamic_pointer_cast<ReplicationCallback>(module)) {
        entry.on_replicate = [hook](const std::shared_ptr<CallbackContext>& context, int64_t id) {
          hook->on_replicate(*context, id);
        };
      }
      view.push_back(std::move(entry));
    }
    views.push_back(std::move(view));
  }
  return execute_replication_callbacks(views);
}

namespace {

// The sequence number autograd gives AccumulateGrad: of the ready nodes, it runs
// first. The nodes below pass parameter gradients on; made before the forward,
// they would otherwise run last (see parameter_alias in replicate.h).
constexpr uint64_t kRunWhenReady = UINT64_MAX;

// Sums the replicas' gradients of one parameter onto the original parameter.
struct ReduceAddToOriginal : torch::autograd::Node {
  explicit ReduceAddToOriginal(at::Device destination) : Node(kRunWhenReady), destination_(destination) {}
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    at::Tensor total;
    for (const auto& grad : grads) {
      if (!grad.defined()) continue;  // a replica that did not use the parameter
      at::Tensor moved = grad.to(destination_);
      if (!total.defined()) {
        total = moved;
      } else {
        // (ATen adds a dense gradient to a sparse one only as dense + sparse: nn.Embedding(sparse=True) used by
        // some replicas, its weight by others too)
        total = total.is_sparse() && !moved.is_sparse() ? moved + total : total + moved;
      }
    }
    return {total};
  }
  std::string name() const override { return "syncbn::ReduceAddToOriginal"; }

 private:
  at::Device destination_;
};

// A replica's parameter: its gradient goes on, unchanged, to the parameter's
// (parameter_alias), or to the parameter's ReduceAddToOriginal node (a clone's:
// one per clone and parameter, linked here, before the replica threads start).
// Each replica thread's graph then links only to nodes of its own: making an
// edge to a node writes to that node (autograd's Node::topological_nr() sets
// has_parent_), so R threads linking their first use of a parameter to the one
// node every clone shares would race (pytorch/pytorch#58442; found by
// ThreadSanitizer).
struct ReplicaParameter : torch::autograd::Node {
  ReplicaParameter() : Node(kRunWhenReady) {}
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override { return std::move(grads); }
  std::string name() const override { return "syncbn::ReplicaParameter"; }
};

// Routes each replica's handle of `parameter` (a detached alias, or a clone's own parameter) through one hop of
// its own to a node summing their gradients in replica order onto `parameter`.
void route_to_ordered_sum(const at::Tensor& parameter, const std::vector<at::Tensor>& handles) {
  auto reduce = c10::make_intrusive<ReduceAddToOriginal>(parameter.device());
  reduce->set_next_edges(torch::autograd::collect_next_edges(parameter));
  for (const at::Tensor& handle : handles) {
    auto hop = c10::make_intrusive<ReplicaParameter>();
    hop->add_next_edge(torch::autograd::Edge(reduce, reduce->add_input_metadata(handle)));
    torch::autograd::set_history(handle, hop);
  }
}

// Throws a ValueError where a clone is null, or lacks a parameter, buffer or submodule of the original, or has one
// of another shape: checked before anything is linked (found halfway, replica 0 would keep some of the original's
// buffers, and an isolated replication's write-back would resize them to the clone's shape).
void check_clones(const char* what, const torch::nn::Module& original,
                  const std::vector<std::shared_ptr<torch::nn::Module>>& clones, const std::string& path) {
  auto name_of = [&path](const std::string& key) { return path.empty() ? key : path + "." + key; };
  for (size_t i = 0; i < clones.size(); ++i) {
    TORCH_CHECK_VALUE(clones[i] != nullptr, what, ": clone ", i, " is null");
    auto compare = [&](const char* kind, const torch::OrderedDict<std::string, at::Tensor>& originals,
                       const torch::OrderedDict<std::string, at::Tensor>& copies) {
      for (const auto& item : originals) {
        const at::Tensor* copy = copies.find(item.key());
        TORCH_CHECK_VALUE(copy != nullptr, what, ": clone ", i, " has no ", kind, " '", name_of(item.key()),
                          "'; a clone must have the original's structure (clone() copies it)");
        TORCH_CHECK_VALUE(!item.value().defined() || !copy->defined() || copy->sizes() == item.value().sizes(), what,
                          ": clone ", i, "'s ", kind, " '", name_of(item.key()), "' has shape ", copy->sizes(),
                          " but the original's has ", item.value().sizes());
      }
    };
    compare("parameter", original.named_parameters(/*recurse=*/false), clones[i]->named_parameters(/*recurse=*/false));
    compare("buffer", original.named_buffers(/*recurse=*/false), clones[i]->named_buffers(/*recurse=*/false));
  }
  for (const auto& child : original.named_children()) {
    std::vector<std::shared_ptr<torch::nn::Module>> child_clones;
    for (size_t i = 0; i < clones.size(); ++i) {
      auto children = clones[i]->named_children();
      const auto* twin = children.find(child.key());
      TORCH_CHECK_VALUE(twin != nullptr && *twin != nullptr, what, ": clone ", i, " has no submodule '",
                        name_of(child.key()), "'; a clone must have the original's structure (clone() copies it)");
      child_clones.push_back(*twin);
    }
    check_clones(what, *child.value(), child_clones, name_of(child.key()));
  }
}

// Replica 0's copies of the original's buffers, by the original's tensor: a module registered at two places of
// the original is two modules in a clone, whose buffers must be one copy again (updated by both, as alone).
using CopiesByOriginal = std::unordered_map<const c10::TensorImpl*, at::Tensor>;

// Walks the original and its clones together (same structure, as clones are).
// Replica 0's buffers share the original's storage, or, given `isolated`, stay
// copies whose pairs with the original's are listed there (one pair per original tensor).
void link_clones(const std::shared_ptr<torch::nn::Module>& original,
                 const std::vector<std::shared_ptr<torch::nn::Module>>& clones,
                 std::vector<std::pair<at::Tensor, at::Tensor>>* isolated, CopiesByOriginal& copies) {
  for (const auto& item : original->named_parameters(/*recurse=*/false)) {
    const at::Tensor& parameter = item.value();
    if (!parameter.defined()) continue;
    if (!parameter.requires_grad()) {
      // clone() registers every parameter anew, requiring grad: a frozen one stays frozen in the replicas.
      for (const auto& clone : clones) clone->named_parameters(/*recurse=*/false)[item.key()].requires_grad_(false);
      continue;
    }
    std::vector<at::Tensor> copies_of_parameter;  // handles to the clones' own parameter tensors
    copies_of_parameter.reserve(clones.size());
    for (const auto& clone : clones) {
      copies_of_parameter.push_back(clone->named_parameters(/*recurse=*/false)[item.key()]);
    }
    route_to_ordered_sum(parameter, copies_of_parameter);
  }
  {
    torch::NoGradGuard no_grad;
    auto replica_buffers = clones.front()->named_buffers(/*recurse=*/false);
    for (const auto& item : original->named_buffers(/*recurse=*/false)) {
      at::Tensor* target = replica_buffers.find(item.key());
      if (target == nullptr || !item.value().defined() || !target->defined() ||
          target->device() != item.value().device()) {
        continue;
      }
      if (isolated != nullptr) {
        const auto [first, inserted] = copies.try_emplace(item.value().unsafeGetTensorImpl(), *target);
        if (inserted) {
          isolated->emplace_back(item.value(), *target);
        } else {
          target->set_(first->second);  // the same copy as the buffer's first place
        }
      } else {
        // Replica 0's buffer object now views the original's storage.
        target->set_(item.value());
      }
    }
  }
  for (const auto& child : original->named_children()) {
    std::vector<std::shared_ptr<torch::nn::Module>> child_clones;
    for (const auto& clone : clones) {
      auto children = clone->named_children();
      child_clones.push_back(*children.find(child.key()));  // (there: check_clones)
    }
    link_clones(child.value(), child_clones, isolated, copies);
  }
}

}  // namespace

namespace detail {

namespace {

struct RememberedReplication {
  std::weak_ptr<torch::nn::Module> first_replica;
  std::shared_ptr<ReplicationGroup> group;
};
thread_local RememberedReplication remembered;

}  // namespace

void remember_replication(const std::shared_ptr<torch::nn::Module>& first_replica,
                          std::shared_ptr<ReplicationGroup> group) {
  remembered = RememberedReplication{first_replica, std::move(group)};
}

std::shared_ptr<ReplicationGroup> take_remembered_replication(const torch::nn::Module* first_replica) {
  const std::shared_ptr<torch::nn::Module> replica = remembered.first_replica.lock();
  if (replica == nullptr || replica.get() != first_replica) return nullptr;
  remembered.first_replica.reset();
  return std::exchange(remembered.group, nullptr);
}

}  // namespace detail

at::Tensor parameter_alias(const at::Tensor& parameter) {
  TORCH_CHECK_VALUE(parameter.defined(), "parameter_alias: the parameter is undefined");
  at::Tensor alias = parameter.detach();
  if (!parameter.requires_grad()) return alias;
  auto node = c10::make_intrusive<ReplicaParameter>();
  node->set_next_edges(torch::autograd::collect_next_edges(parameter));
  torch::autograd::set_history(alias, node);
  return alias;
}

std::vector<at::Tensor> parameter_aliases(const at::Tensor& parameter, int64_t replicas) {
  TORCH_CHECK_VALUE(parameter.defined(), "parameter_aliases: the parameter is undefined");
  TORCH_CHECK_VALUE(replicas >= 1, "parameter_aliases: needs at least one replica, got ", replicas);
  std::vector<at::Tensor> aliases;
  aliases.reserve(replicas);
  for (int64_t replica = 0; replica < replicas; ++replica) aliases.push_back(parameter.detach());
  if (parameter.requires_grad()) route_to_ordered_sum(parameter, aliases);
  return aliases;
}

std::vector<std::shared_ptr<CallbackContext>> complete_replication(
    const std::shared_ptr<torch::nn::Module>& original, const std::vector<std::shared_ptr<torch::nn::Module>>& clones) {
  TORCH_CHECK_VALUE(!clones.empty(), "complete_replication needs at least one clone");
  TORCH_CHECK_VALUE(original != nullptr, "complete_replication: the original module is null");
  check_clones("complete_replication", *original, clones, "");
  CopiesByOriginal unused;
  link_clones(original, clones, nullptr, unused);
  return execute_replication_callbacks(clones);
}

IsolatedReplication::IsolatedReplication(const std::shared_ptr<torch::nn::Module>& original,
                                         const std::vector<std::shared_ptr<torch::nn::Module>>& clones) {
  TORCH_CHECK_VALUE(!clones.empty(), "IsolatedReplication needs at least one clone");
  TORCH_CHECK_VALUE(original != nullptr, "IsolatedReplication: the original module is null");
  check_clones("IsolatedReplication", *original, clones, "");
  std::vector<std::pair<at::Tensor, at::Tensor>> pairs;
  CopiesByOriginal copies;
  link_clones(original, clones, &pairs, copies);
  for (auto& [source, copy] : pairs) buffers_.push_back({source, copy, version_of(source), version_of(copy)});
  contexts_ = execute_replication_callbacks(clones);
}

std::shared_ptr<ReplicationGroup> IsolatedReplication::group() const {
  return contexts_.empty() ? nullptr : contexts_.front()->group();
}

std::optional<int64_t> version_of(const at::Tensor& tensor) {
  if (tensor.is_inference()) return std::nullopt;
  return tensor._version();
}

void write_back_buffers(const std::vector<BufferCopy>& buffers) {
  torch::NoGradGuard no_grad;
  enum class Verdict { kChanged, kUnchanged, kCompareValues };
  auto changed_by_replica = [](const BufferCopy& buffer) {
    if (buffer.copy_version && version_of(buffer.copy) != buffer.copy_version) return Verdict::kChanged;
    if (buffer.original_version && version_of(buffer.original) != buffer.original_version) return Verdict::kUnchanged;
    if (buffer.copy.layout() != at::kStrided || buffer.copy.is_nested()) {
      return buffer.copy_version ? Verdict::kUnchanged : Verdict::kChanged;
    }
    if (!buffer.copy.sizes().equals(buffer.original.sizes())) return Verdict::kChanged;
    return Verdict::kCompareValues;  // written without a version bump (an op's out argument), or not at all
  };
  std::vector<const BufferCopy*> changed, on_device;
  for (const auto& buffer : buffers) {
    switch (changed_by_replica(buffer)) {
      case Verdict::kChanged:
        changed.push_back(&buffer);
        break;
      case Verdict::kUnchanged:
        break;
      case Verdict::kCompareValues:
        if (buffer.copy.device().is_cpu() || buffer.copy.device() != buffer.original.device()) {
          if (!at::equal(buffer.copy, buffer.original)) changed.push_back(&buffer);
        } else {
          on_device.push_back(&buffer);
        }
        break;
    }
  }
  // On an accelerator at::equal waits for the device once per buffer: compare them all, then wait once.
  if (!on_device.empty()) {
    std::vector<at::Tensor> differs;
    const at::Device device = on_device.front()->copy.device();
    for (const auto* buffer : on_device) {
      differs.push_back(at::ne(buffer->copy, buffer->original).any().to(device));
    }
    const at::Tensor verdicts = at::stack(differs).cpu();
    const bool* differ = verdicts.const_data_ptr<bool>();
    for (size_t i = 0; i < on_device.size(); ++i) {
      if (differ[i]) changed.push_back(on_device[i]);
    }
    std::sort(changed.begin(), changed.end());  // written in the buffers' order (elements of one vector)
  }
  // Refused before anything is written, as torch refuses it in the module's own forward.
  for (const auto* buffer : changed) {
    TORCH_CHECK(buffer->original.sizes().equals(buffer->copy.sizes()) || !buffer->original.requires_grad(),
                "cannot resize variables that require grad (replica 0 resized a buffer that requires grad, which the "
                "module alone could not)");
  }
  for (const auto* buffer : changed) {
    if (!buffer->original.sizes().equals(buffer->copy.sizes())) buffer->original.resize_(buffer->copy.sizes());
    buffer->original.copy_(buffer->copy);
  }
}

void IsolatedReplication::write_back() const {
  auto write = [this] { write_back_buffers(buffers_); };
  if (auto replication = group()) {
    replication->commit(write);
  } else {
    write();
  }
}

}  // namespace syncbn
