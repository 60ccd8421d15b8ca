import Foundation

// Codable mirror of mobile_vmoe/schemas/bench_result.schema.json (schema 1.0, docs/BENCH_SCHEMA.md).
// Optional fields are written as explicit JSON nulls: the schema requires the keys to be present.

public struct BenchResult: Codable {
    public var schemaVersion: String = "1.0"
    public var createdAt: String
    public var harness: Harness
    public var device: Device
    public var runtime: Runtime
    public var backend: Backend
    public var model: ModelInfo
    public var precision: String?
    public var input: InputInfo
    public var warmupIterations: Int
    public var timedIterations: Int
    public var coldLoadMs: Double
    public var loadBreakdownMs: [String: Double]
    public var firstInferenceMs: Double
    public var samplesMs: [Double]
    public var stats: Stats
    public var memory: Memory
    public var thermalBefore: Thermal?
    public var thermalAfter: Thermal?
    public var latencyPerExpert: [String: ExpertStats]?
    public var notes: [String]

    enum CodingKeys: String, CodingKey {
        case schemaVersion = "schema_version", createdAt = "created_at", harness, device, runtime, backend, model
        case precision, input, warmupIterations = "warmup_iterations", timedIterations = "timed_iterations"
        case coldLoadMs = "cold_load_ms", loadBreakdownMs = "load_breakdown_ms"
        case firstInferenceMs = "first_inference_ms", samplesMs = "samples_ms", stats, memory
        case thermalBefore = "thermal_before", thermalAfter = "thermal_after"
        case latencyPerExpert = "latency_per_expert", notes
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(schemaVersion, forKey: .schemaVersion)
        try c.encode(createdAt, forKey: .createdAt)
        try c.encode(harness, forKey: .harness)
        try c.encode(device, forKey: .device)
        try c.encode(runtime, forKey: .runtime)
        try c.encode(backend, forKey: .backend)
        try c.encode(model, forKey: .model)
        try c.encode(precision, forKey: .precision)
        try c.encode(input, forKey: .input)
        try c.encode(warmupIterations, forKey: .warmupIterations)
        try c.encode(timedIterations, forKey: .timedIterations)
        try c.encode(coldLoadMs, forKey: .coldLoadMs)
        try c.encode(loadBreakdownMs, forKey: .loadBreakdownMs)
        try c.encode(firstInferenceMs, forKey: .firstInferenceMs)
        try c.encode(samplesMs, forKey: .samplesMs)
        try c.encode(stats, forKey: .stats)
        try c.encode(memory, forKey: .memory)
        try c.encode(thermalBefore, forKey: .thermalBefore)
        try c.encode(thermalAfter, forKey: .thermalAfter)
        try c.encode(latencyPerExpert, forKey: .latencyPerExpert)
        try c.encode(notes, forKey: .notes)
    }
}

public struct Harness: Codable {
    public var name: String = "ios_bench"
    public var version: String = "1.0"
    public var isolatedProcess: Bool?

    enum CodingKeys: String, CodingKey { case name, version, isolatedProcess = "isolated_process" }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(version, forKey: .version)
        try c.encode(isolatedProcess, forKey: .isolatedProcess)
    }
}

public struct Device: Codable {
    public var model: String
    public var os: String
    public var osVersion: String
    public var chip: String?
    public var cpuCount: Int?

    enum CodingKeys: String, CodingKey { case model, os, osVersion = "os_version", chip, cpuCount = "cpu_count" }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(model, forKey: .model)
        try c.encode(os, forKey: .os)
        try c.encode(osVersion, forKey: .osVersion)
        try c.encode(chip, forKey: .chip)
        try c.encode(cpuCount, forKey: .cpuCount)
    }
}

public struct Runtime: Codable {
    public var name: String = "coreml"
    public var version: String
}

public struct Backend: Codable {
    public var name: String
    public var computeUnits: String?
    public var threads: Int?
    public var delegates: [String] = []
    /// MLComputePlan: operations per preferred compute device ("cpu", "gpu", "neural_engine", "unknown").
    public var computePlan: [String: Int]?

    enum CodingKeys: String, CodingKey {
        case name, computeUnits = "compute_units", threads, delegates, computePlan = "compute_plan"
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(computeUnits, forKey: .computeUnits)
        try c.encode(threads, forKey: .threads)
        try c.encode(delegates, forKey: .delegates)
        try c.encode(computePlan, forKey: .computePlan)
    }
}

public struct Routing: Codable {
    public var E: Int
    public var K: Int
    public var L: Int
}

public struct ModelInfo: Codable {
    public var path: String
    public var format: String
    public var sizeBytes: Int?
    public var name: String?
    /// The export sidecar (FILE.mlpackage.json); the host fills it in when it pulls the result.
    public var sidecar: JSONValue?
    public var routing: Routing?

    enum CodingKeys: String, CodingKey { case path, format, sizeBytes = "size_bytes", name, sidecar, routing }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(path, forKey: .path)
        try c.encode(format, forKey: .format)
        try c.encode(sizeBytes, forKey: .sizeBytes)
        try c.encode(name, forKey: .name)
        try c.encode(sidecar, forKey: .sidecar)
        try c.encode(routing, forKey: .routing)
    }
}

public struct ImagesInfo: Codable {
    public var dir: String
    public var count: Int
}

public struct InputInfo: Codable {
    public var shape: [Int]
    public var dtype: String
    public var source: String = "random"
    public var images: ImagesInfo?
    /// The sidecar's preprocessing, applied to the images; null for a random input.
    public var preprocess: Preprocess?

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(shape, forKey: .shape)
        try c.encode(dtype, forKey: .dtype)
        try c.encode(source, forKey: .source)
        try c.encode(images, forKey: .images)
        try c.encode(preprocess, forKey: .preprocess)
    }

    enum CodingKeys: String, CodingKey { case shape, dtype, source, images, preprocess }
}

public struct Stats: Codable, Equatable {
    public var count: Int
    public var p50: Double
    public var p90: Double
    public var p99: Double
    public var mean: Double
    public var std: Double
    public var min: Double
    public var max: Double

    /// Same conventions as mobile_vmoe.bench.latency_stats: numpy's linear-interpolation percentiles and the
    /// population standard deviation (ddof = 0). The host recomputes these from samples_ms anyway.
    public init(samples: [Double]) {
        let a = samples.sorted()
        let n = a.count
        func percentile(_ q: Double) -> Double {
            guard n > 1 else { return a.first ?? 0 }
            let pos = q / 100.0 * Double(n - 1)
            let lo = Int(pos.rounded(.down))
            let hi = Swift.min(lo + 1, n - 1)
            return a[lo] + (a[hi] - a[lo]) * (pos - Double(lo))
        }
        let mean = n > 0 ? a.reduce(0, +) / Double(n) : 0
        let squares = a.map { ($0 - mean) * ($0 - mean) }
        let variance = n > 0 ? squares.reduce(0, +) / Double(n) : 0
        self.count = n
        self.p50 = percentile(50)
        self.p90 = percentile(90)
        self.p99 = percentile(99)
        self.mean = mean
        self.std = variance.squareRoot()
        self.min = a.first ?? 0
        self.max = a.last ?? 0
    }
}

public struct ExpertStats: Codable {
    public var count: Int
    public var p50: Double
    public var mean: Double
}

public struct Memory: Codable {
    public var kind: String = "phys_footprint_peak"
    public var peakBytes: Int?
    public var beforeLoadBytes: Int?
    public var deltaBytes: Int?
    public var pssTotalBytes: Int?

    enum CodingKeys: String, CodingKey {
        case kind, peakBytes = "peak_bytes", beforeLoadBytes = "before_load_bytes", deltaBytes = "delta_bytes"
        case pssTotalBytes = "pss_total_bytes"
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(kind, forKey: .kind)
        try c.encode(peakBytes, forKey: .peakBytes)
        try c.encode(beforeLoadBytes, forKey: .beforeLoadBytes)
        try c.encode(deltaBytes, forKey: .deltaBytes)
        try c.encode(pssTotalBytes, forKey: .pssTotalBytes)
    }
}

public struct Thermal: Codable {
    /// ProcessInfo.ThermalState: "nominal", "fair", "serious" or "critical".
    public var state: String?
    public var zonesCelsius: [String: Double]?

    enum CodingKeys: String, CodingKey { case state, zonesCelsius = "zones_celsius" }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(state, forKey: .state)
        try c.encode(zonesCelsius, forKey: .zonesCelsius)
    }
}

/// Any JSON value (for the export sidecar, which this harness passes through untouched).
public enum JSONValue: Codable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let d = try? c.decode(Double.self) {
            self = .number(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let d): try c.encode(d)
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }
}

public enum ResultWriter {
    public static let beginMarker = "VMOE_BENCH_JSON_BEGIN"
    public static let endMarker = "VMOE_BENCH_JSON_END"

    public static func encode(_ result: BenchResult) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(result)
    }

    /// The app's (or test runner's) Documents directory: `xcrun devicectl device copy from` pulls from there.
    public static func documentsURL(name: String) -> URL {
        let docs = FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0]
        return docs.appendingPathComponent(name)
    }

    /// Write atomically (Foundation writes a temporary file, then renames it) and return the bytes written.
    @discardableResult
    public static func write(_ result: BenchResult, to url: URL) throws -> Data {
        let data = try encode(result)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try data.write(to: url, options: .atomic)
        return data
    }
}
