import CoreML
import Foundation

public struct BenchConfig {
    public var modelURL: URL
    /// "all", "cpuOnly", "cpuAndGPU" or "cpuAndNeuralEngine" (MLComputeUnits).
    public var computeUnits: String
    public var warmup: Int
    public var iterations: Int

    public init(modelURL: URL, computeUnits: String = "all", warmup: Int = 10, iterations: Int = 50) {
        self.modelURL = modelURL
        self.computeUnits = computeUnits
        self.warmup = warmup
        self.iterations = iterations
    }
}

public enum BenchError: Error, CustomStringConvertible {
    case badComputeUnits(String)
    case badCounts(warmup: Int, iterations: Int)
    case modelNotFound(String)
    case unsupportedInput(String)

    public var description: String {
        switch self {
        case .badComputeUnits(let s):
            return "compute units must be all, cpuOnly, cpuAndGPU or cpuAndNeuralEngine, got \(s)"
        case .badCounts(let w, let i):
            return "warm-up must be >= 0 and iterations >= 1, got \(w) and \(i)"
        case .modelNotFound(let s):
            return "model not found: \(s)"
        case .unsupportedInput(let s):
            return "unsupported model input: \(s) (expected one multi-array input, e.g. [1, 3, H, W])"
        }
    }
}

public func parseComputeUnits(_ s: String) throws -> MLComputeUnits {
    switch s {
    case "all": return .all
    case "cpuOnly": return .cpuOnly
    case "cpuAndGPU": return .cpuAndGPU
    case "cpuAndNeuralEngine": return .cpuAndNeuralEngine
    default: throw BenchError.badComputeUnits(s)
    }
}

func milliseconds(_ d: Duration) -> Double {
    let c = d.components
    return Double(c.seconds) * 1000.0 + Double(c.attoseconds) / 1e15
}

func directorySize(_ url: URL) -> Int? {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else { return nil }
    if !isDir.boolValue {
        return (try? FileManager.default.attributesOfItem(atPath: url.path))?[.size] as? Int
    }
    var total = 0
    let keys: [URLResourceKey] = [.fileSizeKey, .isRegularFileKey]
    if let e = FileManager.default.enumerator(at: url, includingPropertiesForKeys: keys) {
        for case let f as URL in e {
            let v = try? f.resourceValues(forKeys: Set(keys))
            if v?.isRegularFile == true { total += v?.fileSize ?? 0 }
        }
    }
    return total
}

func dtypeName(_ t: MLMultiArrayDataType) -> String {
    switch t {
    case .float16: return "float16"
    case .float32: return "float32"
    case .double: return "float64"
    case .int32: return "int32"
    default: return "unknown"
    }
}

/// Operations per preferred compute device, from MLComputePlan (iOS 17.4 / macOS 14.4).
@available(iOS 17.4, macOS 14.4, *)
func computePlanCounts(_ url: URL, _ config: MLModelConfiguration) async throws -> [String: Int] {
    let plan = try await MLComputePlan.load(contentsOf: url, configuration: config)
    var counts = ["cpu": 0, "gpu": 0, "neural_engine": 0]
    guard case let .program(program) = plan.modelStructure else { return counts }
    func visit(_ block: MLModelStructure.Program.Block) {
        for op in block.operations {
            if let usage = plan.deviceUsage(for: op) {  // nil for ops that never dispatch (consts)
                switch usage.preferred {
                case .cpu: counts["cpu", default: 0] += 1
                case .gpu: counts["gpu", default: 0] += 1
                case .neuralEngine: counts["neural_engine", default: 0] += 1
                @unknown default: counts["unknown", default: 0] += 1
                }
            }
            for inner in op.blocks { visit(inner) }
        }
    }
    for (_, function) in program.functions { visit(function.block) }
    return counts
}

public enum CoreMLBenchmark {
    /// Compile and load the model, time the first prediction, `warmup` untimed and `iterations` timed predictions
    /// on one random input, and describe the run in the bench result schema.
    public static func run(_ config: BenchConfig) async throws -> BenchResult {
        let units = try parseComputeUnits(config.computeUnits)
        guard config.warmup >= 0, config.iterations >= 1 else {
            throw BenchError.badCounts(warmup: config.warmup, iterations: config.iterations)
        }
        guard FileManager.default.fileExists(atPath: config.modelURL.path) else {
            throw BenchError.modelNotFound(config.modelURL.path)
        }
        var notes: [String] = []
        let mlConfig = MLModelConfiguration()
        mlConfig.computeUnits = units
        let clock = ContinuousClock()
        let before = Platform.physFootprint()

        // Cold load = compile (.mlpackage -> .mlmodelc) + load (which also specialises for the compute units).
        var breakdown: [String: Double] = [:]
        let compiledURL: URL
        let isCompiled = config.modelURL.pathExtension == "mlmodelc"
        if isCompiled {
            compiledURL = config.modelURL
        } else {
            let t0 = clock.now
            compiledURL = try await MLModel.compileModel(at: config.modelURL)
            breakdown["compile"] = milliseconds(t0.duration(to: clock.now))
        }
        let t1 = clock.now
        let model = try await MLModel.load(contentsOf: compiledURL, configuration: mlConfig)
        breakdown["load"] = milliseconds(t1.duration(to: clock.now))

        let inputs = model.modelDescription.inputDescriptionsByName
        guard inputs.count == 1, let entry = inputs.first, let constraint = entry.value.multiArrayConstraint else {
            throw BenchError.unsupportedInput("\(inputs.keys.sorted())")
        }
        let name = entry.key
        let array = try MLMultiArray(shape: constraint.shape, dataType: constraint.dataType)
        var rng = SystemRandomNumberGenerator()
        for i in 0..<array.count { array[i] = NSNumber(value: Float.random(in: -1...1, using: &rng)) }
        let features = try MLDictionaryFeatureProvider(dictionary: [name: MLFeatureValue(multiArray: array)])

        let t2 = clock.now
        _ = try model.prediction(from: features)
        let first = milliseconds(t2.duration(to: clock.now))

        let thermalBefore = Platform.thermal()
        for _ in 0..<config.warmup { _ = try model.prediction(from: features) }
        var samples: [Double] = []
        samples.reserveCapacity(config.iterations)
        for _ in 0..<config.iterations {
            let t = clock.now
            _ = try model.prediction(from: features)
            samples.append(milliseconds(t.duration(to: clock.now)))
        }
        let thermalAfter = Platform.thermal()
        let after = Platform.physFootprint()

        var plan: [String: Int]? = nil
        if #available(iOS 17.4, macOS 14.4, *) {
            do { plan = try await computePlanCounts(compiledURL, mlConfig) } catch {
                notes.append("MLComputePlan failed: \(error)")
            }
        } else {
            notes.append("compute_plan: null (MLComputePlan needs iOS 17.4 / macOS 14.4)")
        }
        if !isCompiled { try? FileManager.default.removeItem(at: compiledURL) }
        notes.append("latency_per_expert: null (the device harness runs one random input; see docs/BENCH_SCHEMA.md)")

        let memory = Memory(
            kind: "phys_footprint_peak",
            peakBytes: after?.peak,
            beforeLoadBytes: before?.current,
            deltaBytes: (after != nil && before != nil) ? after!.peak - before!.current : nil,
            pssTotalBytes: nil
        )
        return BenchResult(
            createdAt: ISO8601DateFormatter().string(from: Date()),
            harness: Harness(name: "ios_bench", version: "1.0", isolatedProcess: false),
            device: Platform.device(),
            runtime: Runtime(name: "coreml", version: Platform.osVersion()),
            backend: Backend(
                name: "coreml", computeUnits: config.computeUnits, threads: nil, delegates: [], computePlan: plan),
            model: ModelInfo(
                path: config.modelURL.path,
                format: isCompiled ? "mlmodelc" : "mlpackage",
                sizeBytes: directorySize(config.modelURL),
                name: nil,
                sidecar: nil,
                routing: nil
            ),
            precision: nil,
            input: InputInfo(
                shape: constraint.shape.map { $0.intValue }, dtype: dtypeName(constraint.dataType), source: "random",
                images: nil),
            warmupIterations: config.warmup,
            timedIterations: config.iterations,
            coldLoadMs: breakdown.values.reduce(0, +),
            loadBreakdownMs: breakdown,
            firstInferenceMs: first,
            samplesMs: samples,
            stats: Stats(samples: samples),
            memory: memory,
            thermalBefore: thermalBefore,
            thermalAfter: thermalAfter,
            latencyPerExpert: nil,
            notes: notes
        )
    }
}
