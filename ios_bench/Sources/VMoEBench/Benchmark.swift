import CoreML
import CoreVideo
import Foundation

public struct BenchConfig {
    public var modelURL: URL
    /// "all", "cpuOnly", "cpuAndGPU" or "cpuAndNeuralEngine" (MLComputeUnits).
    public var computeUnits: String
    public var warmup: Int
    public var iterations: Int
    /// The export sidecar (FILE.mlpackage.json): its `preprocess` is applied to the images.
    public var sidecarURL: URL?
    /// A directory of images (index.txt gives their order): iteration i runs on image i mod N. nil: one random input.
    public var imagesURL: URL?

    public init(
        modelURL: URL, computeUnits: String = "all", warmup: Int = 10, iterations: Int = 50, sidecarURL: URL? = nil,
        imagesURL: URL? = nil
    ) {
        self.modelURL = modelURL
        self.computeUnits = computeUnits
        self.warmup = warmup
        self.iterations = iterations
        self.sidecarURL = sidecarURL
        self.imagesURL = imagesURL
    }
}

public enum BenchError: Error, CustomStringConvertible {
    case badComputeUnits(String)
    case badCounts(warmup: Int, iterations: Int)
    case modelNotFound(String)
    case unsupportedInput(String)
    case badSidecar(String)
    case badImage(String)
    case inputMismatch(String)

    public var description: String {
        switch self {
        case .badComputeUnits(let s):
            return "compute units must be all, cpuOnly, cpuAndGPU or cpuAndNeuralEngine, got \(s)"
        case .badCounts(let w, let i):
            return "warm-up must be >= 0 and iterations >= 1, got \(w) and \(i)"
        case .modelNotFound(let s):
            return "model not found: \(s)"
        case .unsupportedInput(let s):
            return "unsupported model input: \(s) (expected one image or multi-array input, e.g. [1, 3, H, W])"
        case .badSidecar(let s), .badImage(let s), .inputMismatch(let s):
            return s
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

/// The prepared inputs: one feature provider per image (or one random input), and how to describe them.
struct PreparedInputs {
    var features: [MLFeatureProvider]
    var info: InputInfo
}

/// A 32BGRA pixel buffer for a Core ML image input; `pixel(c, x, y)` gives channel c (0 R, 1 G, 2 B).
func makePixelBuffer(width: Int, height: Int, pixel: (Int, Int, Int) -> UInt8) throws -> CVPixelBuffer {
    var buffer: CVPixelBuffer?
    let attributes =
        [kCVPixelBufferCGImageCompatibilityKey: kCFBooleanTrue, kCVPixelBufferCGBitmapContextCompatibilityKey: kCFBooleanTrue]
        as CFDictionary
    let status = CVPixelBufferCreate(kCFAllocatorDefault, width, height, kCVPixelFormatType_32BGRA, attributes, &buffer)
    guard status == kCVReturnSuccess, let pb = buffer else {
        throw BenchError.badImage("could not create a \(width)x\(height) pixel buffer (CVReturn \(status))")
    }
    CVPixelBufferLockBaseAddress(pb, [])
    defer { CVPixelBufferUnlockBaseAddress(pb, []) }
    guard let base = CVPixelBufferGetBaseAddress(pb)?.assumingMemoryBound(to: UInt8.self) else {
        throw BenchError.badImage("pixel buffer has no memory")
    }
    let bytesPerRow = CVPixelBufferGetBytesPerRow(pb)
    for y in 0..<height {
        for x in 0..<width {
            let p = base + y * bytesPerRow + 4 * x
            p[0] = pixel(2, x, y)
            p[1] = pixel(1, x, y)
            p[2] = pixel(0, x, y)
            p[3] = 255
        }
    }
    return pb
}

/// A fresh (contiguous, C-order) multi-array holding `values`.
func makeMultiArray(_ values: [Float], shape: [NSNumber], dataType: MLMultiArrayDataType) throws -> MLMultiArray {
    let array = try MLMultiArray(shape: shape, dataType: dataType)
    if dataType == .float32 {
        array.withUnsafeMutableBufferPointer(ofType: Float.self) { ptr, _ in
            for i in 0..<values.count { ptr[i] = values[i] }
        }
    } else {
        for i in 0..<values.count { array[i] = NSNumber(value: values[i]) }
    }
    return array
}

/// A text encoder's token ids (the sidecar's `text`, kind "text_encoder"): its input is one caption of the full
/// context, [SOT, "a" ..., EOT] (latency does not depend on the words: every shape is static).
struct TextIds {
    static let filler = 320  // "a" in CLIP's BPE vocabulary
    let sot: Int
    let eot: Int

    /// nil when there is no sidecar or it describes an image model.
    static func fromSidecar(_ url: URL?) throws -> TextIds? {
        guard let url = url else { return nil }
        let obj = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any]
        guard obj?["kind"] as? String == "text_encoder" else { return nil }
        guard let text = obj?["text"] as? [String: Any], let sot = text["sot_id"] as? Int,
            let eot = text["eot_id"] as? Int
        else {
            throw BenchError.badSidecar("\(url.path): a text encoder's sidecar needs text.sot_id and text.eot_id")
        }
        return TextIds(sot: sot, eot: eot)
    }

    func caption(length: Int) -> [Float] {
        (0..<length).map { Float($0 == 0 ? sot : $0 == length - 1 ? eot : TextIds.filler) }
    }
}

/// The images of `config` preprocessed as the sidecar says (resize the shorter side, centre crop, normalise), or
/// one random input. A Core ML image input takes the cropped 8-bit pixels: the model's own scale and bias normalise.
func prepareInputs(_ model: MLModel, _ config: BenchConfig) throws -> PreparedInputs {
    let inputs = model.modelDescription.inputDescriptionsByName
    guard inputs.count == 1, let entry = inputs.first else { throw BenchError.unsupportedInput("\(inputs.keys.sorted())") }
    var pre: Preprocess? = nil
    var files: [URL] = []
    if let dir = config.imagesURL {
        guard let sidecar = config.sidecarURL else {
            throw BenchError.badSidecar(
                "images need the export sidecar (VMOE_SIDECAR, --sidecar): its preprocess says how to resize, crop "
                    + "and normalise them")
        }
        pre = try Preprocess.fromSidecar(sidecar)
        files = Array(try Preprocess.imageFiles(in: dir).prefix(config.iterations))
    }
    let source = pre == nil ? "random" : "images"
    let imagesInfo = config.imagesURL.map { ImagesInfo(dir: $0.path, count: files.count) }
    func feature(_ value: MLFeatureValue) throws -> MLFeatureProvider {
        try MLDictionaryFeatureProvider(dictionary: [entry.key: value])
    }
    if let c = entry.value.imageConstraint {
        let (w, h) = (c.pixelsWide, c.pixelsHigh)
        var buffers: [CVPixelBuffer] = []
        if let pre = pre {
            guard pre.size == w, pre.size == h else {
                throw BenchError.inputMismatch(
                    "the model takes \(w)x\(h) images but the sidecar's preprocess crops \(pre.size)x\(pre.size)")
            }
            for url in files {
                let image = try pre.crop(url)
                buffers.append(try makePixelBuffer(width: w, height: h) { ch, x, y in image.byte(ch, x, y) })
            }
        } else {
            buffers.append(try makePixelBuffer(width: w, height: h) { _, _, _ in UInt8.random(in: 0...255) })
        }
        return PreparedInputs(
            features: try buffers.map { try feature(MLFeatureValue(pixelBuffer: $0)) },
            info: InputInfo(shape: [1, 3, h, w], dtype: "uint8", source: source, images: imagesInfo, preprocess: pre))
    }
    guard let c = entry.value.multiArrayConstraint else { throw BenchError.unsupportedInput("\(entry.key)") }
    let shape = c.shape.map { $0.intValue }
    var arrays: [MLMultiArray] = []
    if let ids = try TextIds.fromSidecar(config.sidecarURL) {
        guard pre == nil else { throw BenchError.inputMismatch("a text encoder takes tokens, not images") }
        guard shape.count == 2, c.dataType == .int32 else {
            throw BenchError.inputMismatch("a text encoder's input must be int32 [1, L], got \(shape)")
        }
        let tokens = try makeMultiArray(ids.caption(length: shape[1]), shape: c.shape, dataType: c.dataType)
        return PreparedInputs(
            features: [try feature(MLFeatureValue(multiArray: tokens))],
            info: InputInfo(shape: shape, dtype: "int32", source: "tokens", images: nil, preprocess: nil))
    }
    if let pre = pre {
        guard shape.count == 4, shape[1] == 3, shape[2] == pre.size, shape[3] == pre.size else {
            throw BenchError.inputMismatch(
                "the model's input is \(shape) but the sidecar's preprocess makes [1, 3, \(pre.size), \(pre.size)]")
        }
        for url in files {
            let image = try pre.crop(url)
            arrays.append(try makeMultiArray(pre.normalised(image), shape: c.shape, dataType: c.dataType))
        }
    } else {
        let count = shape.reduce(1, *)
        let values = (0..<count).map { _ in Float.random(in: -1...1) }
        arrays.append(try makeMultiArray(values, shape: c.shape, dataType: c.dataType))
    }
    return PreparedInputs(
        features: try arrays.map { try feature(MLFeatureValue(multiArray: $0)) },
        info: InputInfo(shape: shape, dtype: dtypeName(c.dataType), source: source, images: imagesInfo, preprocess: pre))
}

public enum CoreMLBenchmark {
    /// Compile and load the model, time the first prediction, `warmup` untimed and `iterations` timed predictions
    /// (iteration i on image i mod N, or on one random input), and describe the run in the bench result schema.
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

        // Decoded and preprocessed after the load (not timed); the memory peak then includes the prepared inputs.
        let prepared = try prepareInputs(model, config)
        let features = prepared.features
        let n = features.count

        let t2 = clock.now
        _ = try model.prediction(from: features[0])
        let first = milliseconds(t2.duration(to: clock.now))

        let thermalBefore = Platform.thermal()
        for j in 0..<config.warmup { _ = try model.prediction(from: features[j % n]) }
        var samples: [Double] = []
        samples.reserveCapacity(config.iterations)
        for i in 0..<config.iterations {
            let x = features[i % n]
            let t = clock.now
            _ = try model.prediction(from: x)
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
        notes.append(
            prepared.info.source == "images"
                ? "latency_per_expert: null on the device (no routing here); `mobile-vmoe bench --target ios --images` "
                    + "fills it in on the host from the image order"
                : "latency_per_expert: null (the device harness ran one random input; see docs/BENCH_SCHEMA.md)")

        let memory = Memory(
            kind: "phys_footprint_peak",
            peakBytes: after?.peak,
            beforeLoadBytes: before?.current,
            deltaBytes: (after != nil && before != nil) ? after!.peak - before!.current : nil,
            pssTotalBytes: nil
        )
        return BenchResult(
            createdAt: ISO8601DateFormatter().string(from: Date()),
            harness: Harness(name: "ios_bench", version: "1.1", isolatedProcess: false),
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
            input: prepared.info,
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
